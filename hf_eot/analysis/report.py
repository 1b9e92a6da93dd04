"""Markdown report of an :class:`~hf_eot.analysis.analyze.AnalysisResult`, for readers who have not read
the paper: what was measured, the per-layer tables, the figures, and what the numbers mean."""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["format_layer_table", "interpretation", "markdown_report", "write_report"]

_FENCHEL = '"Deciphering Attention Mechanisms: Optimization and Fenchel Dual Solutions" (anonymous, under review)'
_EOT = '"Scaled-Dot-Product Attention as One-Sided Entropic Optimal Transport" (Litman, arXiv:2508.08369)'
_PAPER = (
    f"{_FENCHEL}, Sec. 8: \"lambda* almost coincides with its approximated counterpart alpha z inferred by "
    'BERT and T5" (shown as histograms; the paper gives no number or threshold for "almost").'
)
_SPLIT_LABELS = {"unscaled_templates": "dev, t=x", "unscaled_evidence": "dev, z=W_K^T q"}


def _f(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if x == 0:
        return "0"
    if abs(x) < 10 ** (-digits) or abs(x) >= 1e4:
        return f"{x:.1e}"
    return f"{x:.{digits}f}"


def format_layer_table(rows: list[dict], markdown: bool = True) -> str:
    """The per-layer table (Markdown, or aligned plain text for the terminal)."""
    header = [
        "layer",
        "mean dev",
        "median",
        "p90",
        "max",
        "eq. 13 dev",
        *_SPLIT_LABELS.values(),
        "output change",
        "TV(p*, p)",
        "Newton its",
        "entropy",
        "max gap",
        "mapping err",
        "PG residual",
    ]
    body = []
    for r in rows:
        body.append(
            [
                str(r["layer"]),
                _f(r["mean"]),
                _f(r["median"]),
                _f(r["p90"]),
                _f(r["max"]),
                _f(r.get("second_order_mean", math.nan)),
                *(_f(r.get(f"{split}_mean", math.nan)) for split in _SPLIT_LABELS),
                _f(r["output_mean"]),
                _f(r["weights_tv_mean"]),
                f"{_f(r['newton_iters_mean'], 1)} / {int(r['newton_iters_max']) if math.isfinite(r['newton_iters_max']) else 'n/a'}",
                _f(r["entropy_mean"], 2),
                _f(r["max_abs_gap"]),
                _f(r["mapping_error"]),
                _f(r["pg_residual"]),
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*row) for row in body])


def _mean(x) -> float:
    return float(x.double().mean()) if x.numel() else math.nan


def _pooled(component) -> dict[str, float]:
    dev = component.values("relative_deviation").double()
    out = component.values("output_deviation").double()
    tv = component.values("weights_tv").double()
    import numpy as np

    return {
        "n": int(dev.numel()),
        "mean": float(dev.mean()) if dev.numel() else math.nan,
        "median": float(dev.median()) if dev.numel() else math.nan,
        "p90": float(np.percentile(dev.numpy(), 90)) if dev.numel() else math.nan,
        "max": float(dev.max()) if dev.numel() else math.nan,
        "out_mean": float(out.mean()) if out.numel() else math.nan,
        "second_order_mean": _mean(component.values("second_order_deviation")),
        **{split: _mean(component.values(f"relative_deviation_{split}")) for split in _SPLIT_LABELS},
        "tv_mean": float(tv.mean()) if tv.numel() else math.nan,
    }


def interpretation(result) -> str:
    """A paragraph per component that puts the numbers next to the paper's claim."""
    from .mapping import COMPONENT_TITLES, SPLITS

    paras = []
    for name, comp in result.components.items():
        s = _pooled(comp)
        if not s["n"]:
            continue
        rows = comp.layer_table()
        worst = max(rows, key=lambda r: r["mean"] if math.isfinite(r["mean"]) else -1)
        best = min(rows, key=lambda r: r["mean"] if math.isfinite(r["mean"]) else math.inf)
        second = s["second_order_mean"]
        closer = (
            f"Eq. (13)'s second-order approximation lambda_2 = alpha (I + alpha Sigma)^-1 z, which keeps the "
            f"covariance of the templates that alpha z drops, is {_f(second)} from lambda* on average"
            + (
                f", {'closer than' if second < s['mean'] else 'no closer than'} alpha z"
                if math.isfinite(second)
                else ""
            )
        )
        alternatives = [split for split in _SPLIT_LABELS if math.isfinite(s[split])]
        if len(alternatives) == 2 and s[alternatives[0]] == s[alternatives[1]]:  # the same split here
            split_text = f"{_f(s[alternatives[0]])} with {' (equivalently '.join(SPLITS[a] for a in alternatives)})"
        else:
            split_text = "; ".join(f"{_f(s[split])} with {SPLITS[split]}" for split in alternatives)
        paras.append(
            f"**{COMPONENT_TITLES.get(name, name)}.** Over {s['n']:,} (layer, head, query) problems the exact "
            f"maximizer lambda* of the dual (7) differs from the paper's approximation alpha z by "
            f"{_f(s['mean'])} on average (median {_f(s['median'])}, 90th percentile {_f(s['p90'])}, "
            f"max {_f(s['max'])}), from {_f(best['mean'])} in layer {best['layer']} to {_f(worst['mean'])} "
            f"in layer {worst['layer']}, with the paper's split t_i = x_i / sqrt(d'). This number is not a "
            "property of the attention alone: splitting the same score scale differently between the "
            "templates and z leaves every attention row unchanged but changes the dual problem, and the mean "
            f"deviation becomes {split_text}. {closer}. What the difference does: the attention row computed "
            f"with lambda* is on average {_f(s['tv_mean'])} away from the model's row in total variation, and "
            f"the head's output moves by {_f(s['out_mean'])} of the typical value-vector norm."
        )
        off = [r["layer"] for r in rows if math.isfinite(r["mapping_error"]) and r["mapping_error"] > 1e-4]
        if off:
            paras[-1] += (
                f" Caution: in layer(s) {', '.join(map(str, off))} eq. (16) does not reproduce the model's weights "
                f"(mapping error up to {_f(max(r['mapping_error'] for r in rows if r['layer'] in off))}), so "
                "these deviations do not describe that attention."
            )
        elif all(not math.isfinite(r["mapping_error"]) for r in rows):
            paras[-1] += (
                " The attention implementation returned no weights, so the mapping was not checked against "
                "the model (run with attn_implementation='eager')."
            )
    return "\n\n".join(paras)


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def markdown_report(
    result, directory: str | Path, figures: dict[str, dict[str, Path]] | None = None, raw: bool = True
) -> str:
    """The report text; figure links are relative to `directory` (where the report will live)."""
    from .mapping import COMPONENT_TITLES

    directory = Path(directory)
    meta = result.meta
    label = Path(result.model_name).name or result.model_name
    lines = [
        f"# Attention as a Fenchel dual: analysis of `{label}`",
        "",
        f"- model: `{result.model_name}` ({meta.get('architecture', result.model_type)}, model type "
        f"`{result.model_type}`), attention implementation `{meta.get('attn_implementation')}`",
        f"- inputs: {meta.get('num_examples')} examples"
        + (f" ({meta['inputs']})" if meta.get("inputs") else "")
        + f"; {meta.get('problems', 0):,} dual problems solved "
        f"(alpha = {result.alpha:g}, Newton to relative gradient norm {result.tol:g} in float64; "
        f"{meta.get('not_converged', 0)} did not converge)",
        f"- time: {_f(meta.get('wall_s', math.nan), 1)} s in all, of which forward passes "
        f"{_f(meta.get('forward_s', math.nan), 1)} s, dual solver {_f(meta.get('solver_s', math.nan), 1)} s, "
        f"certificates {_f(meta.get('certificates_s', math.nan), 1)} s ({meta.get('processes', 1)} process(es))",
        "",
        "## What is measured",
        "",
        f"For every layer, head and query, attention picks weights p over the keys. {_FENCHEL} reads this as "
        "inference: find p close to a preference distribution u (KL) whose mean of templates t_i matches "
        "mu + z (problem 3). Its Fenchel dual (7) is a smooth concave problem in lambda; the paper replaces "
        "the maximizer lambda* by alpha z (eq. 14), and that replacement is exactly the softmax attention "
        "row (eq. 16). Here lambda* is computed exactly (Newton's method), with the mapping of the paper's "
        "Sec. 8 for every architecture: t_i = x_i / sqrt(d'), z = scaling sqrt(d') W_K^T q (= W_K^T q for "
        "BERT and ViT, whose scaling is 1 / sqrt(d'); T5 has scaling 1), alpha = 1 / epsilon (1 unless the "
        "model runs hf_eot's softmax at temperature epsilon), u uniform on the real tokens (T5: proportional "
        "to exp(position bias))."
        + (f" Temperatures per layer: {meta['epsilon']}." if any(
            e != 1.0 for eps in meta.get("epsilon", {}).values() for e in eps) else ""),
        "",
        "- **mean dev / median / p90 / max**: ||lambda* - alpha z|| / ||lambda*|| over the layer's heads and "
        "queries (the paper's Fig. 4-8).",
        "- **eq. 13 dev**: mean ||lambda* - lambda_2|| / ||lambda*|| for the paper's second-order "
        "approximation lambda_2 = alpha (I + alpha Sigma)^-1 z (Sigma = Cov_u(t); one Newton step from 0).",
        "- **dev, t=x** and **dev, z=W_K^T q**: the mean deviation when the score scale is split differently "
        "between templates and evidence (t_i = x_i, z = scaling W_K^T q; or t_i = scaling x_i, z = W_K^T q). "
        "The attention is identical under every split; lambda* is not, so the deviation is a property of the "
        "chosen split as much as of the model.",
        "- **output change**: ||o(lambda*) - o(alpha z)|| / sqrt(E_p ||v||^2), how far the head's output "
        "moves relative to its value vectors; **TV(p*, p)**: total variation between the two attention rows.",
        "- **Newton its**: mean / max iterations to reach the tolerance.",
        "- **entropy**: of the attention rows (nats). **max gap**: the largest |primal - dual| of the one-sided "
        f"entropic OT problem ({_EOT}) at the model's own rows, primal <C,p> - epsilon H(p) (T5: minus "
        "epsilon <p, position bias>) against the log-sum-exp dual; zero up to the model's float round-off "
        "(float32: about 1e-7 of the values) certifies that the rows are the exact EOT solutions.",
        "- **mapping err**: max |eq. (16) with lambda = alpha z - the model's attention weights|: the "
        "mapping (t, z, u) reproduces the model to round-off.",
        "- **PG residual**: relative residual of dL/ds_j = p_j (g_j - E_p[g]) / epsilon (backprop as an "
        "advantage-weighted policy gradient) for L = 0.5 ||o||^2.",
        "",
    ]
    for name, comp in result.components.items():
        what = COMPONENT_TITLES.get(name, name)
        lines += [f"## {what[0].upper() + what[1:]}", "", format_layer_table(comp.layer_table()), ""]
        figs = (figures or {}).get(name, {})
        if "histograms" in figs:
            lines += [
                f"![{what}: deviation histograms per layer]({_rel(figs['histograms'], directory)})",
                "",
                "Per layer: the distribution over queries of the deviation averaged over the heads, with its mean "
                "in red (the layout of the paper's Fig. 4).",
                "",
            ]
        if "heatmap" in figs:
            lines += [f"![{what}: mean deviation per head]({_rel(figs['heatmap'], directory)})", ""]
        if "output_heatmap" in figs:
            lines += [
                f"![{what}: mean output change per head]({_rel(figs['output_heatmap'], directory)})",
                "",
            ]
        if "head_histograms" in figs:
            lines += [
                f"Per-head distributions (the paper's Appendix C): [{figs['head_histograms'].name}]"
                f"({_rel(figs['head_histograms'], directory)})",
                "",
            ]
        certs = comp.layer_table()
        eff = [r["fisher_eff_rank_mean"] for r in certs]
        lines += [
            f"EOT certificates: the largest |gap| over all rows is {_f(max(r['max_abs_gap'] for r in certs))}; "
            f"the Fisher information diag(p) - p p^T (the Hessian of the log-sum-exp potential) has mean "
            f"effective rank {', '.join(_f(e, 1) for e in eff)} per layer.",
            "",
        ]
    lines += ["## What it means", "", _PAPER, "", interpretation(result), ""]
    lines += ["## Files", ""]
    if raw:
        lines += [
            "- `results.safetensors`: every per-query tensor, `<component>.<metric>` indexed "
            "[layer, head, example, query] (NaN at padding), `<component>.query_mask`, and the per-head "
            "`mapping_error` and `pg_residual`. Load with `hf_eot.analysis.AnalysisResult.load(<this folder>)`; "
            "`.to_pandas()` gives one row per (component, layer, head, example, query).",
        ]
    lines += ["- `results.json`: run metadata, the tables above and per-head means.", ""]
    return "\n".join(lines)


def write_report(
    result, directory: str | Path, figures: dict[str, dict[str, Path]] | None = None, raw: bool = True
) -> Path:
    """Writes ``report.md`` into `directory` and returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "report.md"
    path.write_text(markdown_report(result, directory, figures, raw=raw))
    return path
