"""Converged Sinkhorn attention against its peers, measured in one run (forward + backward).

    python benchmarks/sinkhorn.py                        # n in {512, 1024}, logit std in {1, 4}
    python benchmarks/sinkhorn.py --sizes 256 --stds 1 --repeats 1 --no-memory

Shapes: batch 2, 8 heads, head dim 64, float32; scores ``q k^T / sqrt(d)`` scaled to the given logit
standard deviation, epsilon 1, weights applied to values, backward of a random output gradient.
Peers, timed in the same process (best of ``--repeats`` after a warm-up):

* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (softmax attention, fused);
* ``plain-10``: a plain log-domain Sinkhorn unrolled for 10 iterations (:func:`plain_sinkhorn`, far
  from converged at std 4), differentiated by autograd;
* ``hf_eot tol=1e-6``: :func:`hf_eot.ops.sinkhorn_weights` to a column-marginal error of 1e-6,
  implicit backward (the default); ``--unroll`` adds the same with ``grad="unroll"`` (plain
  iterations, slow at std 4);
* ``hf_eot 10 it``: ``n_iters=10`` (implicit backward);
* ``POT``: ``ot.bregman.sinkhorn_log`` (numpy float64, forward only) on one problem, time times
  ``B * H``, to the same accuracy (POT's ``stopThr`` is on its own 2-norm marginal error).

Also printed: the column-marginal error reached, iterations (hf_eot's; plain Sinkhorn's iterations to
1e-6, counted in float64), and the peak memory of one forward + backward as the increase of the
peak resident set size of a fresh process (``VmHWM``), in units of ``B*H*n*n`` floats.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

from hf_eot.ops import sinkhorn_weights
from hf_eot.ops.sinkhorn import SinkhornConvergenceWarning

B, H, D = 2, 8, 64
TOL = 1e-6


def plain_sinkhorn(scores: torch.Tensor, n_iters: int) -> torch.Tensor:
    """Textbook log-domain Sinkhorn (rows sum to 1, columns to n_q / n_k), unrolled."""
    log_b = math.log(scores.shape[-2] / scores.shape[-1])
    log_v = torch.zeros_like(scores[..., 0, :])
    log_u = -torch.logsumexp(scores + log_v.unsqueeze(-2), dim=-1)
    for _ in range(n_iters):
        log_v = log_b - torch.logsumexp(scores + log_u.unsqueeze(-1), dim=-2)
        log_u = -torch.logsumexp(scores + log_v.unsqueeze(-2), dim=-1)
    return torch.exp(scores + log_u.unsqueeze(-1) + log_v.unsqueeze(-2))


def plain_iterations_to(scores: torch.Tensor, tol: float, cap: int = 5000) -> int:
    """Iterations plain Sinkhorn needs to a column-marginal error <= tol (float64, scaling form)."""
    f = scores.double()
    kern = torch.exp(f - f.amax(dim=-1, keepdim=True))
    b = scores.shape[-2] / scores.shape[-1]
    v = torch.ones_like(f[..., 0, :])
    for it in range(cap + 1):
        u = 1.0 / torch.matmul(kern, v.unsqueeze(-1)).squeeze(-1)
        s = torch.matmul(u.unsqueeze(-2), kern).squeeze(-2)
        if float((v * s - b).abs().max()) <= tol:
            return it
        v = b / s
    return cap


def inputs(n: int, std: float, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g = (torch.randn(B, H, n, D, generator=gen) for _ in range(4))
    q, k = q * math.sqrt(std), k * math.sqrt(std)  # q k^T / sqrt(d) has std `std`
    return q, k, v, g


def methods(unroll: bool = False) -> dict[str, Callable]:
    def weights_then_values(fn: Callable) -> Callable:
        def run(q, k, v):
            return torch.matmul(fn(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D)), v)

        return run

    found = {
        "sdpa": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v),
        "plain-10": weights_then_values(lambda s: plain_sinkhorn(s, 10)),
        "hf_eot tol=1e-6": weights_then_values(lambda s: sinkhorn_weights(s, tol=TOL).weights),
        "hf_eot 10 it": weights_then_values(lambda s: sinkhorn_weights(s, n_iters=10).weights),
    }
    if unroll:
        found["hf_eot tol=1e-6 unroll"] = weights_then_values(
            lambda s: sinkhorn_weights(s, tol=TOL, grad="unroll").weights
        )
    return found


def fwd_bwd(fn: Callable, q, k, v, g) -> None:
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(g)


def best_time(fn: Callable, args: tuple, repeats: int) -> float:
    fn(*args)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times), max(times)


def pot_forward(q, k, n: int) -> tuple[float, int]:
    """POT's ``sinkhorn_log`` (numpy, float64, no gradient) on the first problem to the same accuracy
    (``stopThr`` on POT's 2-norm marginal error, scaled by ``1 / n``); returns the time scaled by the
    number of problems ``B * H`` and POT's iteration count."""
    import ot

    s = (torch.matmul(q[0, 0], k[0, 0].T) / math.sqrt(D)).double().numpy()
    a = np.full(n, 1.0 / n)
    t0 = time.perf_counter()
    _, log = ot.bregman.sinkhorn_log(a, a, -s, 1.0, numItermax=5000, stopThr=TOL / n, log=True, warn=False)
    return (time.perf_counter() - t0) * B * H, int(log["niter"])


def peak_memory_child(name: str, n: int, std: float) -> None:
    """In a fresh process: peak RSS increase (bytes) of one forward + backward, printed."""
    q, k, v, g = inputs(n, std)
    fn = methods(unroll=True)[name]
    with open("/proc/self/statm") as fh:
        rss = int(fh.read().split()[1]) * resource.getpagesize()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SinkhornConvergenceWarning)
        fwd_bwd(fn, q, k, v, g)
    # VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork + exec
    with open("/proc/self/status") as fh:
        peak = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    print(max(peak - rss, 0))


def peak_memory(name: str, n: int, std: float) -> float:
    # a fixed 1 MiB mmap threshold makes glibc return every large block on free: RSS follows live memory
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", name, str(n), str(std)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return int(out.stdout.strip().splitlines()[-1]) / (4 * B * H * n * n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--stds", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-pot", action="store_true")
    parser.add_argument("--unroll", action="store_true", help="also time grad='unroll' to 1e-6")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peak_memory_child(args.child[0], int(args.child[1]), float(args.child[2]))
        return
    warnings.simplefilter("ignore", SinkhornConvergenceWarning)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; B={B} H={H} d={D} float32, fwd+bwd")
    print("time: best of repeats (spread = max/min), ratios vs sdpa and vs plain-10 in the same run")
    for n in args.sizes:
        for std in args.stds:
            q, k, v, g = inputs(n, std)
            s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D)
            res = sinkhorn_weights(s, tol=TOL)
            plain_err = sinkhorn_weights(s, n_iters=10).marginal_error.max().item()
            print(
                f"\nn={n} std={std}: hf_eot tol=1e-6 -> {res.n_iters} iterations, error "
                f"{res.marginal_error.max().item():.2g}; plain Sinkhorn needs {plain_iterations_to(s, TOL)} "
                f"iterations to 1e-6; error after 10 plain iterations {plain_err:.2g}"
            )
            times = {}
            for name, fn in methods(args.unroll).items():
                times[name] = best_time(fwd_bwd, (fn, q, k, v, g), args.repeats)
            print(f"{'method':<24}{'time s':>9}{'spread':>8}{'/sdpa':>8}{'/plain-10':>11}{'peak mem /BHn^2 floats':>24}")
            for name, (t, t_max) in times.items():
                mem = "" if args.no_memory or std != args.stds[-1] else f"{peak_memory(name, n, std):.2f}"
                print(
                    f"{name:<24}{t:>9.3f}{t_max / t:>8.2f}{t / times['sdpa'][0]:>8.1f}"
                    f"{t / times['plain-10'][0]:>11.2f}{mem:>24}"
                )
            if not args.no_pot:
                t_pot, it_pot = pot_forward(q, k, n)
                print(
                    f"{'POT sinkhorn_log (fwd)':<24}{t_pot:>9.3f}{'':>8}{t_pot / times['sdpa'][0]:>8.1f}"
                    f"{t_pot / times['plain-10'][0]:>11.2f}   ({it_pot} iterations; 1 problem x {B * H})"
                )


if __name__ == "__main__":
    main()
