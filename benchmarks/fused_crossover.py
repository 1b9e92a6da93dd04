"""Where the fused sparse attention starts to pay: ``entmax_attention`` against the weights path.

    python benchmarks/fused_crossover.py

For sparsemax and 1.5-entmax at 128 to 1024 keys (the batch shrinking as the length grows, 12 heads, head
dim 32, a quarter of the keys padded, attention dropout 0 and 0.1), one torch thread: the CPU time of a
forward+backward of ``entmax_attention`` and of ``dropout(entmax_weights(scores)) @ value``, best of 5
interleaved runs, and their ratio (below 1: the fused map is faster).  ``hf_eot.ops.sparse_attention``'s
``FUSED_MIN_KEYS`` is set from it.
"""

from __future__ import annotations

import time

import torch

from hf_eot.ops import entmax_attention, entmax_weights

SHAPES = ((16, 12, 128, 32), (8, 12, 256, 32), (4, 12, 512, 32), (2, 12, 1024, 32))


def _cpu_ms(fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn().sum().backward()
        best = min(best, time.process_time() - start)
    return best * 1e3


def main() -> None:
    torch.set_num_threads(1)
    print("| batch x heads x keys | alpha | dropout | weights path ms | fused ms | fused / weights path |")
    print("|---|---:|---:|---:|---:|---:|")
    for batch, heads, n, dim in SHAPES:
        torch.manual_seed(0)
        q, k, v = (torch.randn(batch, heads, n, dim, requires_grad=True) for _ in range(3))
        mask = torch.ones(batch, 1, n, n, dtype=torch.bool)
        mask[..., n - n // 4 :] = False
        for alpha in (2.0, 1.5):
            for p in (0.0, 0.1):
                def weights_path():
                    weights = entmax_weights((q @ k.transpose(-1, -2)) * dim**-0.5, alpha, mask)
                    return torch.nn.functional.dropout(weights, p) @ v

                def fused():
                    return entmax_attention(q, k, v, alpha=alpha, mask=mask, dropout=p)

                unfused_ms, fused_ms = _cpu_ms(weights_path), _cpu_ms(fused)
                print(f"| {batch} x {heads} x {n} | {alpha} | {p} | {unfused_ms:.0f} | {fused_ms:.0f} | "
                      f"{fused_ms / unfused_ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
