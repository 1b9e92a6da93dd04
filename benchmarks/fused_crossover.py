"""Where the fused sparse attention starts to pay: ``entmax_attention`` against the weights path.

    python benchmarks/fused_crossover.py          # fused vs weights path, by length
    python benchmarks/fused_crossover.py csr      # sparse CSR products vs dense ones, by support size

For sparsemax, 1.5-entmax and 1.3-entmax (Newton's threshold: hf_eot's native CPU kernel on both paths
where it is built) at 128 to 1024 keys (the batch shrinking as the length grows, 12 heads, head
dim 32, a quarter of the keys padded, attention dropout 0 and 0.1), one torch thread: the CPU time of a
forward+backward of ``entmax_attention`` and of ``dropout(entmax_weights(scores)) @ value``, best of 5
runs each, and their ratio (below 1: the fused map is faster).  ``hf_eot.ops.sparse_attention``'s
``FUSED_MIN_KEYS`` is set from it.

``csr``: at 1024 keys (batch 2, 8 heads, head dim 64, one torch thread), logits ``q k^T / sqrt(d)`` scaled
so that the mean support holds 1/250 to about 1/3 of the keys, the CPU time of a forward+backward of
``entmax_attention`` with the blocks that take their threshold from the top k computed by sparse CSR
products and by dense products on the scattered weights; ``CSR_FRACTION`` is set from it.
"""

from __future__ import annotations

import time

import torch

from hf_eot.ops import entmax_attention, entmax_weights, sparse_attention

SHAPES = ((16, 12, 128, 32), (8, 12, 256, 32), (4, 12, 512, 32), (2, 12, 1024, 32))


def _weights_path(q, k, v, alpha, mask, p):
    weights = entmax_weights((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, alpha, mask)
    return torch.nn.functional.dropout(weights, p) @ v


def _fused(q, k, v, alpha, mask, p):
    return entmax_attention(q, k, v, alpha=alpha, mask=mask, dropout=p)


def _scaled(q, k, v, alpha, scale):
    return entmax_attention(q, k, v, alpha=alpha, scale=scale)


def _cpu_ms(fn, args: tuple, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn(*args).sum().backward()
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
        for alpha in (2.0, 1.5, 1.3):
            for p in (0.0, 0.1):
                call = (q, k, v, alpha, mask, p)
                unfused_ms, fused_ms = _cpu_ms(_weights_path, call), _cpu_ms(_fused, call)
                print(f"| {batch} x {heads} x {n} | {alpha} | {p} | {unfused_ms:.0f} | {fused_ms:.0f} | "
                      f"{fused_ms / unfused_ms:.2f} |", flush=True)


def csr_crossover() -> None:
    torch.set_num_threads(1)
    print("| alpha | logit scale | mean support / keys | CSR ms | dense ms | CSR / dense |")
    print("|---:|---:|---:|---:|---:|---:|")
    batch, heads, n, dim = 2, 8, 1024, 64
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, dim, requires_grad=True) for _ in range(3))
    for alpha, scales in ((2.0, (1.0, 0.5, 0.25, 0.1)), (1.5, (2.0, 1.0, 0.5, 0.25)), (1.3, (4.0, 2.0, 1.0, 0.7))):
        for scale in scales:
            ms = {}
            for name, fraction in (("csr", 1.0), ("dense", 0.0)):
                sparse_attention.CSR_FRACTION = fraction
                ms[name] = _cpu_ms(_scaled, (q, k, v, alpha, scale * dim**-0.5))
            with torch.no_grad():
                weights = entmax_weights((q @ k.transpose(-1, -2)) * (scale * dim**-0.5), alpha)
                support = float((weights > 0).sum(dim=-1).float().mean()) / n
            print(f"| {alpha} | {scale} | {support:.3f} | {ms['csr']:.0f} | {ms['dense']:.0f} | "
                  f"{ms['csr'] / ms['dense']:.2f} |", flush=True)


if __name__ == "__main__":
    import sys

    csr_crossover() if sys.argv[1:] == ["csr"] else main()
