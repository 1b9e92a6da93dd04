"""Two rows of ``benchmarks/attention.py`` timed with their calls interleaved: the ratio of one to the other.

    python benchmarks/interleaved.py "eot softmax" "transformers sdpa"          # n = 512 and 1024
    python benchmarks/interleaved.py "eot entmax 1.3" "eot entmax 1.5" --sizes 1024 --repeats 21

``attention.py`` times each row on its own (best of a few), so a slow minute of a shared machine lands on
one row only.  Here the two rows' calls alternate on the same inputs (batch 2, 8 heads, head dim 64,
float32, as in ``attention.py``), forward alone and forward+backward, and each ratio is the median over
rounds of the two calls of one round, so that drifts of the machine cancel out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _interleave import interleaved_seconds, ratio_summary  # noqa: E402
from attention import candidates  # noqa: E402  (the rows of benchmarks/attention.py)


def _call(attention, q, k, v, grad: torch.Tensor | None):
    """One forward (``grad`` None) or forward+backward call of ``attention``, as a function of nothing."""
    if grad is None:
        return lambda: _forward(attention, q, k, v)
    return lambda: attention(q, k, v).backward(grad)


def _forward(attention, q, k, v) -> None:
    with torch.no_grad():
        attention(q, k, v)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("row", help="a row label of benchmarks/attention.py")
    p.add_argument("baseline", help="the row it is divided by")
    p.add_argument("--sizes", nargs="+", type=int, default=[512, 1024])
    p.add_argument("--repeats", type=int, default=11, help="rounds (after one warm-up round)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = candidates(heads=8, d=64)
    unknown = {args.row, args.baseline} - set(table)
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}; valid: {sorted(table)}")
    pair = {label: table[label][0] for label in (args.row, args.baseline)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B=2 H=8 d=64 float32")
    print(
        f"| n | pass | {args.row} median ms | {args.baseline} median ms | median of per-round ratios | min - max |"
    )
    print("|---:|---|---:|---:|---:|---|")
    for n in args.sizes:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 8, n, 64, generator=gen).requires_grad_() for _ in range(3))
        for name, grad in (("fwd", None), ("fwd+bwd", torch.randn(2, n, 8, 64, generator=gen))):
            calls = {label: _call(attention, q, k, v, grad) for label, attention in pair.items()}
            times = interleaved_seconds(calls, args.repeats)
            median, low, high = ratio_summary(times[args.row], times[args.baseline])
            print(
                f"| {n} | {name} | {statistics.median(times[args.row]) * 1e3:.1f} | "
                f"{statistics.median(times[args.baseline]) * 1e3:.1f} | {median:.3f} | {low:.3f} - {high:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
