"""The power in alpha-entmax (Newton's sums, the weights): ``torch.pow`` against ``exp(r log t)``.

    python benchmarks/entmax_power.py

On ``t = [X - tau]_+`` shaped like one block's top entries (2048 rows x 200 candidates, about half of
them 0), one torch thread: the best of 20 CPU times of ``torch.pow`` and of
``hf_eot.ops.entmax._exp_log_power``, their ratio, and the largest error of ``exp(r log t)`` relative to
the row sums it enters (``sum_j t_j^r``), for the exponents ``r = 1/(alpha-1) - 1`` of alpha = 1.1 to
1.5.  ``torch.pow`` has fast paths for some exponents (1, 2, 3 among them): there hf_eot keeps it.
"""

from __future__ import annotations

import time

import torch

from hf_eot.ops.entmax import _exp_log_power


def _best_ms(fn, repeats: int = 20) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best * 1e3


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t = (torch.rand(2048, 200) - 0.5).clamp_(min=0.0)
    out = torch.empty_like(t)
    print("| alpha | exponent | torch.pow ms | exp(r log t) ms | ratio | max error / row sum |")
    print("|---:|---:|---:|---:|---:|---:|")
    for alpha in (1.1, 1.2, 1.25, 1.3, 4 / 3, 1.4, 1.5):
        r = 1.0 / (alpha - 1.0) - 1.0
        pow_ms = _best_ms(lambda r=r: torch.pow(t, r, out=out))
        fast_ms = _best_ms(lambda r=r: _exp_log_power(t, r, out))
        exact = t.double().pow(r)
        error = (out.double() - exact).abs().amax(dim=-1) / exact.sum(dim=-1).clamp(min=1e-300)
        print(f"| {alpha:.3g} | {r:.3f} | {pow_ms:.2f} | {fast_ms:.2f} | {fast_ms / pow_ms:.2f} | "
              f"{float(error.max()):.1e} |", flush=True)


if __name__ == "__main__":
    main()
