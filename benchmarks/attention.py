"""Speed and memory of the "eot" attention function for every regularizer, against the references
measured in the same run: ``attn_implementation="sdpa"`` (Transformers' function around
``torch.nn.functional.scaled_dot_product_attention``) for all, the raw torch kernel for information
(it skips the contiguous output copy that the attention contract requires), and the ``entmax``
package's ``sparsemax`` / ``entmax15`` for the sparse maps.

    python benchmarks/attention.py                 # n in {128, 512, 1024, 2048}, batch 2, 8 heads, d 64
    python benchmarks/attention.py --sizes 128 512 --repeats 5

Each cell is the best of ``--repeats`` runs.  Memory is the size of the tensors autograd saves for the
backward pass (measured with ``torch.autograd.graph.saved_tensors_hooks``; the activation memory that
training pays), and on CUDA also the peak allocated memory.  Ratios are against SDPA, and against the
``entmax`` package for sparsemax / entmax-1.5 (< 1 means hf_eot is faster / smaller).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
from torch import nn
from transformers import BertConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import hf_eot
from hf_eot.integration.attention import eot_attention_forward

SETTINGS: dict[str, tuple[str, dict]] = {
    "softmax": ("softmax", {}),
    "softmax eps=0.5": ("softmax", {"epsilon": 0.5}),
    "softmax+alibi": ("softmax", {"prior": "alibi"}),
    "sparsemax": ("sparsemax", {}),
    "entmax-1.5": ("entmax", {}),
    "entmax-1.3 (bisect)": ("entmax", {"alpha": 1.3}),
    "sinkhorn (20 it)": ("sinkhorn", {"n_iters": 20}),
    "ot": ("ot", {}),
}
OT_MAX_N = 512  # the OT attention costs O(n^3) per head


class _Attention(nn.Module):
    """The attributes of a Transformers attention module that the "eot" function reads."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.is_causal = False
        self.layer_idx = 0
        self.num_attention_heads = config.num_attention_heads
        self.query = nn.Identity()


def _eot(name: str | None, params: dict, heads: int, d: int) -> Callable:
    config = BertConfig(hidden_size=heads * d, num_attention_heads=heads)
    config._attn_implementation = "eot"
    if name is not None:
        hf_eot.configure(config, name, **params)
    module = _Attention(config)

    def run(q, k, v):
        return eot_attention_forward(module, q, k, v, None, scaling=d**-0.5)[0]

    return run


def _transformers_sdpa(heads: int, d: int) -> Callable:
    """What attn_implementation="sdpa" runs: Transformers' SDPA function (fused kernel, contiguous
    (batch, n, heads, d) output as the attention contract requires)."""
    module = _Attention(BertConfig(hidden_size=heads * d, num_attention_heads=heads))

    def run(q, k, v):
        return sdpa_attention_forward(module, q, k, v, None, scaling=d**-0.5)[0]

    return run


def _torch_sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def _entmax_package(fn: Callable) -> Callable:
    def run(q, k, v):
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        return (fn(scores, dim=-1) @ v).transpose(1, 2)

    return run


def _run_once(fn: Callable, q, k, v, backward: bool) -> tuple[float, float]:
    """(seconds, MiB saved for backward) of one call."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    qq, kk, vv = (x.detach().requires_grad_(backward) for x in (q, k, v))
    if q.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(qq, kk, vv)
    if backward:
        out.sum().backward()
    if q.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, saved[0] / 2**20


def _measure_all(candidates: dict[str, Callable], q, k, v, repeats: int) -> dict[str, tuple[float, float, float]]:
    """Best-of-``repeats`` (forward s, forward+backward s, saved MiB) per candidate.  Repeats are
    interleaved across candidates, so that a slow phase of the machine hits all of them alike."""
    best = {label: [math.inf, math.inf, 0.0] for label in candidates}
    for _ in range(repeats):
        for label, fn in candidates.items():
            fwd, _ = _run_once(fn, q, k, v, backward=False)
            both, mem = _run_once(fn, q, k, v, backward=True)
            cell = best[label]
            cell[0], cell[1], cell[2] = min(cell[0], fwd), min(cell[1], both), mem
    return {label: tuple(cell) for label, cell in best.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 1024, 2048])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="+", default=None, metavar="LABEL",
                        help="measure only these rows (the SDPA reference is always measured)")
    args = parser.parse_args(argv)
    from entmax import entmax15, sparsemax

    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"batch={args.batch} heads={args.heads} head_dim={args.dim}; best of {args.repeats}")
    candidates: dict[str, Callable] = {
        "sdpa (reference)": _transformers_sdpa(args.heads, args.dim),
        "torch sdpa, raw": _torch_sdpa,
        "eot, no config": _eot(None, {}, args.heads, args.dim),
        **{label: _eot(name, params, args.heads, args.dim) for label, (name, params) in SETTINGS.items()},
        "entmax pkg sparsemax": _entmax_package(sparsemax),
        "entmax pkg entmax15": _entmax_package(entmax15),
    }
    if args.only:
        unknown = set(args.only) - set(candidates)
        if unknown:
            parser.error(f"unknown rows {sorted(unknown)}; valid: {sorted(candidates)}")
        candidates = {k: v for k, v in candidates.items() if k == "sdpa (reference)" or k in args.only}
    package_of = {"sparsemax": "entmax pkg sparsemax", "entmax-1.5": "entmax pkg entmax15"}
    for n in args.sizes:
        torch.manual_seed(0)
        q, k, v = (torch.randn(args.batch, args.heads, n, args.dim, device=args.device) for _ in range(3))
        active = {label: fn for label, fn in candidates.items() if not (label == "ot" and n > OT_MAX_N)}
        results = _measure_all(active, q, k, v, args.repeats)
        ref_fwd, ref_both, _ = results["sdpa (reference)"]
        print(f"\nn = {n}")
        print(f"| {'attention':<22} | fwd ms | fwd+bwd ms | saved MiB | fwd / sdpa | fwd+bwd / sdpa | "
              f"fwd / entmax pkg | fwd+bwd / entmax pkg |")
        print("|" + "---|" * 9)
        for label, (fwd, both, mem) in results.items():
            vs_pkg = ("", "")
            if label in package_of and package_of[label] in results:
                pkg_fwd, pkg_both, _ = results[package_of[label]]
                vs_pkg = (f"{fwd / pkg_fwd:.2f}", f"{both / pkg_both:.2f}")
            print(f"| {label:<22} | {fwd * 1e3:8.1f} | {both * 1e3:8.1f} | {mem:8.1f} | {fwd / ref_fwd:6.2f} | "
                  f"{both / ref_both:6.2f} | {vs_pkg[0]:>5} | {vs_pkg[1]:>5} |")
        if n > OT_MAX_N:
            print(f"(ot skipped at n={n}: O(n^3) per head)")


if __name__ == "__main__":
    main()
