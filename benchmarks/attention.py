"""Speed and peak memory of every attention map, as ratios to torch SDPA measured in the same run.

    python benchmarks/attention.py                  # n in {512, 1024}, batch 2, 8 heads, d 64, float32
    python benchmarks/attention.py --quick          # n = 256, one repeat: a smoke run of a few minutes
    python benchmarks/attention.py --only ot "entmax 1.3"  # some rows (torch SDPA is always measured)

Rows: the "eot" attention function (hf_eot's Transformers glue) configured for softmax, sparsemax,
1.5-entmax, 1.3-entmax (by hf_eot's native CPU kernel where it is built, and by its torch path with
``HF_EOT_NATIVE=0``) and OT attention; Transformers' ``attn_implementation="sdpa"`` function (the
peer of "eot" softmax); the ``entmax`` package's ``sparsemax``, ``entmax15`` and ``entmax_bisect``;
an eager softmax (``softmax(q k^T / sqrt(d)) v``, the memory yardstick of the sparse maps); and, at
logit std 1 and 4, doubly stochastic (Sinkhorn) attention four ways: hf_eot's
``ops.sinkhorn_weights`` to a column-marginal error of 1e-6 (at most 200 iterations) and with its
fixed budget of the plain Sinkhorn's 10 iterations (``n_iters=10``), a plain
unrolled log-domain Sinkhorn (10 iterations, plain autograd), and POT's batched log-domain Bregman
projection (``ot.batch.bregman_log_projection_batch``, tol 1e-6 on its potentials, at most 200
iterations, gradient of the last step).  The iterations each solver needs to reach a
column-marginal error of 1e-6 on one head (at most 1000) are printed below each table.

Times are the best of ``--repeats`` interleaved runs (rows slower than ``--slow`` seconds run once),
with the allocator's default settings.  "peak MiB" is the resident memory a forward+backward call adds
on top of its inputs, measured once per row in a second process (this script with ``--peaks-only``):
on Linux the process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` before each call,
with glibc's allocator set to return every block of >= 64 KiB to the system, which would slow down
timed calls), on CUDA ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from transformers import BertConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import hf_eot
from hf_eot import ops
from hf_eot.integration.attention import eot_attention_forward

TOL = 1e-6  # Sinkhorn target: column-marginal error
PLAIN_ITERS = 10
# Iteration caps of the timed rows (float32 round-off can keep a solver's stopping test above 1e-6;
# the iteration counts printed below each table say where a solver got to).
HF_MAX_ITERS = 200
POT_MAX_ITERS = 200
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------ candidates


class _Module(nn.Module):
    """The attributes of a Transformers attention module that the attention functions read."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.is_causal = False
        self.layer_idx = 0
        self.num_attention_heads = config.num_attention_heads


def _eot(name: str, params: dict, heads: int, d: int) -> Attention:
    config = BertConfig(hidden_size=heads * d, num_attention_heads=heads)
    config._attn_implementation = "eot"
    hf_eot.configure(config, name, **params)
    module = _Module(config)
    return lambda q, k, v: eot_attention_forward(module, q, k, v, None, scaling=d**-0.5)[0]


def _transformers_sdpa(heads: int, d: int) -> Attention:
    module = _Module(BertConfig(hidden_size=heads * d, num_attention_heads=heads))
    return lambda q, k, v: sdpa_attention_forward(module, q, k, v, None, scaling=d**-0.5)[0]


def _torch_sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def _weights_then_values(weights: Callable[[torch.Tensor], torch.Tensor], logit_std: float = 1.0) -> Attention:
    """``weights(scores) @ v`` with ``scores = q k^T / sqrt(d)`` rescaled by ``logit_std``."""

    def run(q, k, v):
        scores = (q @ k.transpose(-1, -2)) * (logit_std * q.shape[-1] ** -0.5)
        return (weights(scores) @ v).transpose(1, 2)

    return run


def plain_sinkhorn(scores: torch.Tensor, n_iters: int) -> torch.Tensor:
    """The plain unrolled log-domain Sinkhorn (square problems, row and column sums 1)."""
    log_p = scores.log_softmax(dim=-1)
    for _ in range(n_iters):
        log_p = log_p - log_p.logsumexp(dim=-2, keepdim=True)  # columns
        log_p = log_p - log_p.logsumexp(dim=-1, keepdim=True)  # rows
    return log_p.exp()


def _hf_sinkhorn(scores: torch.Tensor) -> torch.Tensor:
    try:
        res = ops.sinkhorn_weights(scores, tol=TOL, max_iters=HF_MAX_ITERS, grad="implicit")
    except TypeError:  # a version without implicit gradients
        res = ops.sinkhorn_weights(scores, tol=TOL, max_iters=HF_MAX_ITERS)
    return res.weights


def _hf_sinkhorn_fixed(scores: torch.Tensor) -> torch.Tensor:
    """hf_eot's fixed-budget mode: the same iterations as the plain Sinkhorn, implicit gradient."""
    return ops.sinkhorn_weights(scores, n_iters=PLAIN_ITERS).weights


def _pot_sinkhorn(scores: torch.Tensor) -> torch.Tensor:
    import ot.batch

    flat = scores.reshape(-1, *scores.shape[-2:])
    ones = torch.ones(flat.shape[:-1], dtype=flat.dtype)
    plan = ot.batch.bregman_log_projection_batch(flat, ones, ones, max_iter=POT_MAX_ITERS, tol=TOL, grad="last_step")["T"]
    return plan.reshape(scores.shape)


def _without_native(attention: Attention) -> Attention:
    """``attention`` with hf_eot's native CPU kernels switched off (``HF_EOT_NATIVE=0``) during its calls."""

    def call(*args: torch.Tensor) -> torch.Tensor:
        before = os.environ.get("HF_EOT_NATIVE")
        os.environ["HF_EOT_NATIVE"] = "0"
        try:
            return attention(*args)
        finally:
            if before is None:
                del os.environ["HF_EOT_NATIVE"]
            else:
                os.environ["HF_EOT_NATIVE"] = before

    return call


def candidates(heads: int, d: int) -> dict[str, tuple[Attention, str | None]]:
    """label -> (attention, label of its peer for the last column)."""
    from entmax import entmax15, entmax_bisect, sparsemax

    rows: dict[str, tuple[Attention, str | None]] = {
        "torch sdpa": (_torch_sdpa, None),
        "transformers sdpa": (_transformers_sdpa(heads, d), None),
        "softmax, eager": (_weights_then_values(lambda s: s.softmax(-1)), None),
        "eot softmax": (_eot("softmax", {}, heads, d), "transformers sdpa"),
        "eot sparsemax": (_eot("sparsemax", {}, heads, d), "pkg sparsemax"),
        "eot sparsemax, torch path": (_without_native(_eot("sparsemax", {}, heads, d)), "eot sparsemax"),
        "eot entmax 1.5": (_eot("entmax", {"alpha": 1.5}, heads, d), "pkg entmax15"),
        "eot entmax 1.5, torch path": (_without_native(_eot("entmax", {"alpha": 1.5}, heads, d)), "eot entmax 1.5"),
        "eot entmax 1.3": (_eot("entmax", {"alpha": 1.3}, heads, d), "pkg entmax_bisect 1.3"),
        "eot entmax 1.3, torch path": (_without_native(_eot("entmax", {"alpha": 1.3}, heads, d)), "eot entmax 1.3"),
        "pkg sparsemax": (_weights_then_values(lambda s: sparsemax(s, dim=-1)), None),
        "pkg entmax15": (_weights_then_values(lambda s: entmax15(s, dim=-1)), None),
        "pkg entmax_bisect 1.3": (_weights_then_values(lambda s: entmax_bisect(s, 1.3, dim=-1)), None),
        "eot ot": (_eot("ot", {}, heads, d), None),
    }
    for std in (1, 4):
        plain = f"sinkhorn plain {PLAIN_ITERS} it, std {std}"
        rows[f"sinkhorn hf_eot tol 1e-6, std {std}"] = (_weights_then_values(_hf_sinkhorn, std), plain)
        fixed = _weights_then_values(_hf_sinkhorn_fixed, std)
        rows[f"sinkhorn hf_eot {PLAIN_ITERS} it, std {std}"] = (fixed, plain)
        rows[plain] = (_weights_then_values(lambda s: plain_sinkhorn(s, PLAIN_ITERS), std), None)
        rows[f"sinkhorn POT tol 1e-6, std {std}"] = (_weights_then_values(_pot_sinkhorn, std), plain)
    return rows


# ------------------------------------------------------------------------------------- measuring


def _limit_malloc_caching() -> bool:
    """Make glibc return every freed block of >= 64 KiB to the system (so that peak RSS measures
    each call); False where that is not possible."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(-3, 64 * 1024)) and bool(libc.mallopt(-1, 64 * 1024))  # MMAP/TRIM threshold
        libc.malloc_trim(0)  # release what start-up left cached
        return ok
    except OSError:
        return False


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_mib(fn: Attention, q, k, v) -> float:
    """Memory one forward+backward call adds at its peak (NaN where it cannot be measured)."""
    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
    gc.collect()
    if q.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(qq, kk, vv).sum().backward()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        base = _rss_kib("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return math.nan
    fn(qq, kk, vv).sum().backward()
    return (_rss_kib("VmHWM:") - base) / 1024


def _time_once(fn: Attention, q, k, v, backward: bool) -> float:
    qq, kk, vv = (x.detach().requires_grad_(backward) for x in (q, k, v))
    if q.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(qq, kk, vv)
    if backward:
        out.sum().backward()
    if q.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(rows: dict[str, Attention], q, k, v, repeats: int, slow: float) -> dict[str, list[float]]:
    """label -> [forward s, forward+backward s, peak MiB (NaN until :func:`measure_peaks`)]; best of
    ``repeats`` interleaved runs, rows slower than ``slow`` seconds run once."""
    best = {label: [math.inf, math.inf, math.nan] for label in rows}
    for rep in range(repeats):
        for label, fn in rows.items():
            cell = best[label]
            if rep > 0 and cell[1] > slow:
                continue
            cell[0] = min(cell[0], _time_once(fn, q, k, v, backward=False))
            cell[1] = min(cell[1], _time_once(fn, q, k, v, backward=True))
            print(f"  [{label}: {cell[0]:.3f} s / {cell[1]:.3f} s]", file=sys.stderr, flush=True)
    return best


def measure_peaks(rows: dict[str, Attention], q, k, v) -> dict[str, float]:
    """label -> peak MiB of one forward+backward call."""
    return {label: _peak_mib(fn, q, k, v) for label, fn in rows.items()}


def peaks_in_subprocess(argv: list[str]) -> dict[str, dict[str, float]] | None:
    """Peak MiB of every row and size, measured by this script in a fresh process (``--peaks-only``), whose
    allocator returns freed blocks to the system from the start; None if that process fails."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "peaks.json")
        done = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--peaks-only", path], check=False)
        if done.returncode != 0:
            return None
        with open(path) as f:
            return json.load(f)


def iterations_to_tol(scores: torch.Tensor, max_iters: int = 1000) -> dict[str, str]:
    """Iterations each Sinkhorn needs to reach a column-marginal error of ``TOL`` on ``scores``."""
    out: dict[str, str] = {}
    with torch.no_grad():
        try:
            res = ops.sinkhorn_weights(scores, tol=TOL, max_iters=max_iters)
            out["hf_eot"] = f"{res.n_iters} (error {float(res.marginal_error.max()):.1e})"
        except Exception as err:  # noqa: BLE001 - report, do not stop the benchmark
            out["hf_eot"] = f"failed: {err}"
        log_p = scores.log_softmax(dim=-1)
        it = 0
        err = math.inf
        while it < max_iters:
            log_p = log_p - log_p.logsumexp(dim=-2, keepdim=True)
            log_p = log_p - log_p.logsumexp(dim=-1, keepdim=True)
            it += 1
            err = float((log_p.exp().sum(-2) - 1).abs().max())
            if err <= TOL:
                break
        out["plain"] = f"{it} (error {err:.1e})"
        try:
            import ot.batch

            flat = scores.reshape(-1, *scores.shape[-2:])
            ones = torch.ones(flat.shape[:-1], dtype=flat.dtype)
            res = ot.batch.bregman_log_projection_batch(flat, ones, ones, max_iter=max_iters, tol=TOL)
            plan = res["T"]
            pot_err = float(torch.maximum((plan.sum(-2) - 1).abs().max(), (plan.sum(-1) - 1).abs().max()))
            out["POT"] = f"{int(res['n_iters'])} (error {pot_err:.1e})"
        except Exception as err:  # noqa: BLE001
            out["POT"] = f"failed: {err}"
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slow", type=float, default=4.0, help="rows slower than this (s) run once")
    parser.add_argument("--quick", action="store_true", help="n = 256, one repeat")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="+", default=None, metavar="LABEL", help="measure only these rows")
    parser.add_argument("--output", default=None, help="also append the report to this file")
    parser.add_argument("--peaks-only", default=None, metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = [256], 1
    warnings.filterwarnings("ignore", category=ops.SinkhornConvergenceWarning)

    table = candidates(args.heads, args.dim)
    if args.only:
        unknown = set(args.only) - set(table)
        if unknown:
            parser.error(f"unknown rows {sorted(unknown)}; valid: {sorted(table)}")
        table = {k: v for k, v in table.items() if k == "torch sdpa" or k in args.only}

    lines: list[str] = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    rows = {label: fn for label, (fn, _) in table.items()}
    inputs = {}
    for n in args.sizes:
        torch.manual_seed(0)
        inputs[n] = tuple(torch.randn(args.batch, args.heads, n, args.dim, device=args.device) for _ in range(3))
    if args.peaks_only:  # the child process of peaks_in_subprocess
        if args.device == "cpu" and not _limit_malloc_caching():
            sys.exit(1)
        with open(args.peaks_only, "w") as f:
            json.dump({str(n): measure_peaks(rows, *inputs[n]) for n in args.sizes}, f)
        return
    # timings with the allocator's defaults here, peaks in a fresh process
    timings = {n: measure(rows, *inputs[n], args.repeats, args.slow) for n in args.sizes}
    given = sys.argv[1:] if argv is None else list(argv)
    peaks = peaks_in_subprocess(given)
    malloc_ok = peaks is not None
    for n in args.sizes:
        for label in rows:
            timings[n][label][2] = peaks[str(n)][label] if peaks else math.nan

    emit(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} batch={args.batch} "
         f"heads={args.heads} head_dim={args.dim} float32; best of {args.repeats} (rows over {args.slow:g} s: 1); "
         f"peak RSS {'per call, in a fresh process' if malloc_ok else 'not measured'}")
    emit(f"command: python benchmarks/attention.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    native = ops.native_kernels_available()
    emit(f"hf_eot native CPU kernels: {'built' if native else 'not available (torch path)'}")
    for n in args.sizes:
        q, k, v = inputs[n]
        results = timings[n]
        ref_fwd, ref_both, ref_mem = results["torch sdpa"]
        emit(f"\nn = {n}")
        emit("| attention | fwd ms | fwd+bwd ms | fwd / torch sdpa | fwd+bwd / torch sdpa | peak MiB | "
             "fwd+bwd / peer (peer) |")
        emit("|---|---:|---:|---:|---:|---:|---|")
        for label, (fwd, both, mem) in results.items():
            peer = table[label][1]
            vs = f"{both / results[peer][1]:.2f} ({peer})" if peer in results else ""
            emit(f"| {label} | {fwd * 1e3:.1f} | {both * 1e3:.1f} | {fwd / ref_fwd:.2f} | {both / ref_both:.2f} | "
                 f"{mem:.0f} | {vs} |")
        if any(label.startswith("sinkhorn") for label in table):
            for std in (1, 4):
                scores = (q[:1, :1] @ k[:1, :1].transpose(-1, -2)) * (std * args.dim**-0.5)
                its = iterations_to_tol(scores)
                emit(f"iterations to a column-marginal error of {TOL:g} (n={n}, logit std {std}, one head): "
                     + ", ".join(f"{name} {count}" for name, count in its.items()))
    if args.output:
        with open(args.output, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
