"""Figures of an :class:`~hf_eot.analysis.analyze.AnalysisResult` (PNG).

The only module of the package that imports matplotlib, and only inside its functions. It draws on
``matplotlib.figure.Figure`` with the Agg canvas directly, so it never touches pyplot's global backend.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

__all__ = ["plot_deviation_histograms", "plot_head_heatmap", "plot_head_histograms", "write_figures"]


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is an optional dependency
        raise ImportError("the figures need matplotlib: pip install 'hf_eot[analysis]'") from e
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _head_averaged(component, layer: int) -> torch.Tensor:
    """Per (example, query): the deviation averaged over the layer's heads (the paper's Fig. 4)."""
    x = component.relative_deviation[layer].double()  # (H, B, Q)
    return x.mean(0).reshape(-1)[component.query_mask.reshape(-1)]


def plot_deviation_histograms(component, path: str | Path, *, title: str = "", dpi: int = 90) -> Path:
    """One histogram per layer of ||lambda* - alpha z|| / ||lambda*|| averaged over the heads, with the
    mean as a red vertical line (the layout of the paper's Fig. 4)."""
    L = component.num_layers
    cols = min(L, 3) if L != 4 else 2
    rows = math.ceil(L / cols)
    fig = _figure(3.1 * cols, 2.3 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    all_vals = torch.cat([_head_averaged(component, i) for i in range(L)])
    all_vals = all_vals[torch.isfinite(all_vals)]
    hi = float(all_vals.max()) * 1.05 if all_vals.numel() else 1.0
    for layer in range(rows * cols):
        ax = axes[layer // cols][layer % cols]
        if layer >= L:
            ax.set_visible(False)
            continue
        vals = _head_averaged(component, layer)
        vals = vals[torch.isfinite(vals)].numpy()
        ax.hist(vals, bins=40, range=(0, hi), color="#4c72b0", alpha=0.85)
        if vals.size:
            mean = float(vals.mean())
            ax.axvline(mean, color="red", lw=1.5)
            ax.text(
                0.97,
                0.92,
                f"mean {mean:.3f}",
                transform=ax.transAxes,
                ha="right",
                va="top",
                fontsize=8,
                color="red",
            )
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.tick_params(labelsize=7)
        if layer // cols == rows - 1:
            ax.set_xlabel(r"$\|\lambda^* - \alpha z\| / \|\lambda^*\|$", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, dpi)


def plot_head_histograms(component, path: str | Path, *, title: str = "", dpi: int = 70) -> Path:
    """A layer x head grid of deviation histograms (the paper's Appendix C, Fig. 5-8)."""
    L, H = component.num_layers, component.num_heads
    fig = _figure(1.15 * H + 0.5, 0.95 * L + 0.6)
    axes = fig.subplots(L, H, squeeze=False, sharex=True)
    x = component.relative_deviation
    finite = x[torch.isfinite(x)]
    hi = float(finite.max()) * 1.05 if finite.numel() else 1.0
    for layer in range(L):
        for head in range(H):
            ax = axes[layer][head]
            vals = component.values("relative_deviation", layer, head).numpy()
            ax.hist(vals, bins=25, range=(0, hi), color="#4c72b0")
            if vals.size:
                ax.axvline(float(vals.mean()), color="red", lw=1)
            ax.set_yticks([])
            ax.tick_params(labelsize=5)
            if layer == 0:
                ax.set_title(f"h{head}", fontsize=7)
            if head == 0:
                ax.set_ylabel(f"L{layer}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path, dpi)


def plot_head_heatmap(
    component, path: str | Path, *, metric: str = "relative_deviation", title: str = "", dpi: int = 90
) -> Path:
    """Layer x head heatmap of the mean of a per-query metric, each cell annotated."""
    means = component.head_means(metric).numpy()
    L, H = means.shape
    fig = _figure(0.55 * H + 1.6, 0.45 * L + 1.0)
    ax = fig.subplots()
    im = ax.imshow(means, cmap="viridis", aspect="auto")
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    ax.set_xlabel("head", fontsize=8)
    ax.set_ylabel("layer", fontsize=8)
    ax.tick_params(labelsize=7)
    lo, hi = float(means.min()), float(means.max())
    for i in range(L):
        for j in range(H):
            v = means[i, j]
            bright = (v - lo) / (hi - lo + 1e-12) > 0.6
            ax.text(
                j,
                i,
                f"{v:.2f}" if v < 10 else f"{v:.0f}",
                ha="center",
                va="center",
                fontsize=6,
                color="black" if bright else "white",
            )
    fig.colorbar(im, ax=ax, shrink=0.9)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path, dpi)


def write_figures(result, directory: str | Path) -> dict[str, dict[str, Path]]:
    """All figures of a result into `directory`; returns ``{component: {kind: path}}``."""
    from .mapping import COMPONENT_TITLES

    directory = Path(directory)
    out: dict[str, dict[str, Path]] = {}
    label = Path(result.model_name).name or result.model_name
    for name, comp in result.components.items():
        what = COMPONENT_TITLES.get(name, name)
        out[name] = {
            "histograms": plot_deviation_histograms(
                comp,
                directory / f"{name}_deviation_hist.png",
                title=f"{label}: {what}, deviation per layer (each query averaged over heads)",
            ),
            "head_histograms": plot_head_histograms(
                comp, directory / f"{name}_deviation_per_head.png", title=f"{label}: {what}, per head"
            ),
            "heatmap": plot_head_heatmap(
                comp,
                directory / f"{name}_deviation_heatmap.png",
                title=f"mean ||lambda* - alpha z|| / ||lambda*|| ({what})",
            ),
            "output_heatmap": plot_head_heatmap(
                comp,
                directory / f"{name}_output_change_heatmap.png",
                metric="output_deviation",
                title=f"mean head-output change ({what})",
            ),
        }
    return out
