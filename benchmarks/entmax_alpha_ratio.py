"""What a Newton-threshold alpha costs against the exact 1.5-entmax in the fused attention, measured
interleaved.

    python benchmarks/entmax_alpha_ratio.py                    # alpha 1.3 vs 1.5 at n = 512 and 1024
    python benchmarks/entmax_alpha_ratio.py --alphas 1.3 1.7 --sizes 1024 --repeats 21

``benchmarks/attention.py`` times each map's rows one after the other (best of a few), so a slow
minute of this shared machine lands on one row only; here the maps' calls alternate (1.5, 1.3, 1.5,
1.3, ...) for the same inputs (B = 2, H = 8, d = 64, float32, forward+backward of
``ops.entmax_attention``, 2 threads), and each ratio is the median over rounds of the two calls of one
round, so that drifts of the machine cancel out.  Newton's alphas run on hf_eot's native CPU kernel where
it is built (``HF_EOT_NATIVE=0``: the torch path).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

from hf_eot.ops import entmax_attention, native_kernels_available

sys.path.insert(0, str(Path(__file__).parent))
from _interleave import interleaved_seconds, ratio_summary  # noqa: E402


def _forward_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, alpha: float
) -> None:
    """One forward+backward of the fused map."""
    entmax_attention(q, k, v, alpha=alpha).backward(grad)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--alphas", nargs="+", type=float, default=[1.3], help="compared with --baseline")
    p.add_argument("--baseline", type=float, default=1.5)
    p.add_argument("--sizes", nargs="+", type=int, default=[512, 1024])
    p.add_argument("--repeats", type=int, default=11, help="rounds (after one warm-up round)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    native = "built" if native_kernels_available() else "not available (torch path)"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, B=2 H=8 d=64 float32, fwd+bwd; "
        f"hf_eot native CPU kernels: {native}"
    )
    print(
        f"| n | alpha | median ms | {args.baseline} median ms | median of per-round ratios | min - max ratio |"
    )
    print("|---:|---:|---:|---:|---:|---|")
    for n in args.sizes:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 8, n, 64, generator=gen).requires_grad_() for _ in range(3))
        grad = torch.randn(2, 8, n, 64, generator=gen)
        calls = {
            alpha: partial(_forward_backward, q, k, v, grad, alpha) for alpha in (args.baseline, *args.alphas)
        }
        times = interleaved_seconds(calls, args.repeats)
        base = times[args.baseline]
        for alpha in args.alphas:
            median, low, high = ratio_summary(times[alpha], base)
            print(
                f"| {n} | {alpha:g} | {statistics.median(times[alpha]) * 1e3:.0f} | "
                f"{statistics.median(base) * 1e3:.0f} | {median:.2f} | {low:.2f} - {high:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
