"""What :func:`hf_eot.analysis.analyze.analyze` returns: per-query and per-head tensors, their summaries
(the per-layer tables), tabular export and persistence."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .mapping import SPLITS

__all__ = ["HEAD_METRICS", "QUERY_METRICS", "AnalysisResult", "ComponentResult"]

#: Per-query metrics, each ``(L, H, B, Q)``. ``relative_deviation`` is ||lambda* - alpha z|| / ||lambda*||
#: under the paper's split; ``relative_deviation_<split>`` the same under the other splits of
#: :data:`hf_eot.analysis.mapping.SPLITS`; ``second_order_deviation`` ||lambda* - lambda_2|| / ||lambda*||
#: for eq. (13)'s lambda_2.
QUERY_METRICS = (
    "relative_deviation",
    *(f"relative_deviation_{s}" for s in SPLITS if s != "paper"),
    "second_order_deviation",
    "output_deviation",
    "weights_tv",
    "n_iters",
    "rel_grad_norm",
    "primal",
    "dual",
    "gap",
    "entropy",
    "fisher_top_eig",
    "fisher_eff_rank",
)
HEAD_METRICS = ("mapping_error", "pg_residual")


@dataclass
class ComponentResult:
    """Results for one kind of attention (``encoder``, ``decoder`` or ``cross``).

    Attributes:
        name: the component.
        metrics: ``QUERY_METRICS`` -> ``(L, H, B, Q)`` float tensors, NaN at padded queries.
        head_metrics: ``HEAD_METRICS`` -> ``(L, H)``.
        query_mask: ``(B, Q)`` bool, True at real queries.
    """

    name: str
    metrics: dict[str, torch.Tensor]
    head_metrics: dict[str, torch.Tensor]
    query_mask: torch.Tensor

    @property
    def relative_deviation(self) -> torch.Tensor:
        return self.metrics["relative_deviation"]

    @property
    def num_layers(self) -> int:
        return self.relative_deviation.shape[0]

    @property
    def num_heads(self) -> int:
        return self.relative_deviation.shape[1]

    def values(self, metric: str, layer: int | None = None, head: int | None = None) -> torch.Tensor:
        """The finite values of a per-query metric, optionally for one layer and/or head (1-D); empty for a
        metric the result does not hold (saved by an older version)."""
        if metric not in self.metrics:
            return torch.empty(0)
        x = self.metrics[metric]
        if layer is not None:
            x = x[layer]
        if head is not None:
            x = x[..., head, :, :] if layer is None else x[head]
        x = x.reshape(-1)
        return x[torch.isfinite(x)]

    def layer_table(self) -> list[dict[str, float]]:
        """One row per layer; statistics pool all heads and real queries of the layer."""
        rows = []
        for layer in range(self.num_layers):
            dev = self.values("relative_deviation", layer).double()
            out = self.values("output_deviation", layer).double()
            rows.append(
                {
                    "layer": layer,
                    "heads": self.num_heads,
                    "queries": int(self.query_mask.sum()) * self.num_heads,
                    "mean": _stat(dev, "mean"),
                    "median": _stat(dev, "median"),
                    "p90": _stat(dev, "p90"),
                    "max": _stat(dev, "max"),
                    "second_order_mean": _stat(self.values("second_order_deviation", layer).double(), "mean"),
                    **{
                        f"{s}_mean": _stat(self.values(f"relative_deviation_{s}", layer).double(), "mean")
                        for s in SPLITS
                        if s != "paper"
                    },
                    "output_mean": _stat(out, "mean"),
                    "output_max": _stat(out, "max"),
                    "weights_tv_mean": _stat(self.values("weights_tv", layer).double(), "mean"),
                    "newton_iters_mean": _stat(self.values("n_iters", layer).double(), "mean"),
                    "newton_iters_max": _stat(self.values("n_iters", layer).double(), "max"),
                    "entropy_mean": _stat(self.values("entropy", layer).double(), "mean"),
                    "fisher_eff_rank_mean": _stat(self.values("fisher_eff_rank", layer).double(), "mean"),
                    "max_abs_gap": _stat(self.values("gap", layer).double().abs(), "max"),
                    "mapping_error": _nanmax(self.head_metrics["mapping_error"][layer]),
                    "pg_residual": _nanmax(self.head_metrics["pg_residual"][layer]),
                }
            )
        return rows

    def head_means(self, metric: str = "relative_deviation") -> torch.Tensor:
        """``(L, H)`` mean of a per-query metric over examples and queries."""
        x = self.metrics[metric].double()
        finite = torch.isfinite(x)
        total = torch.where(finite, x, torch.zeros_like(x)).sum(dim=(-2, -1))
        return total / finite.sum(dim=(-2, -1)).clamp_min(1)


def _stat(x: torch.Tensor, how: str) -> float:
    if x.numel() == 0:
        return math.nan
    if how == "mean":
        return float(x.mean())
    if how == "median":
        return float(x.median())
    if how == "p90":
        import numpy as np

        return float(np.percentile(x.cpu().numpy(), 90))
    if how == "max":
        return float(x.max())
    raise ValueError(how)


def _nanmax(x: torch.Tensor) -> float:
    x = x[torch.isfinite(x)]
    return float(x.max()) if x.numel() else math.nan


@dataclass
class AnalysisResult:
    """What :func:`analyze` found. ``result.relative_deviation[layer, head, example, query]`` is the
    encoder self-attention (or the only attention) deviation; T5's decoder self-attention and
    cross-attention sit beside it in ``result.decoder`` and ``result.cross``.

    Attributes:
        model_name: a label for the model (path or name).
        model_type: ``config.model_type``.
        alpha, tol: alpha of problem (3) at epsilon = 1 (a layer running softmax with temperature
            epsilon is analysed with alpha / epsilon) and the solver's tolerance.
        components: ``"encoder"`` / ``"decoder"`` / ``"cross"`` -> :class:`ComponentResult`.
        examples: optional labels of the examples (the sentences), in batch order.
        meta: run information (timings, problem counts, versions, attention implementation).
    """

    model_name: str
    model_type: str
    alpha: float
    tol: float
    components: dict[str, ComponentResult]
    examples: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def relative_deviation(self) -> torch.Tensor:
        """``(L, H, B, Q)`` ||lambda* - alpha z|| / ||lambda*|| of the encoder self-attention."""
        return self.components["encoder"].relative_deviation

    @property
    def encoder(self) -> ComponentResult:
        return self.components["encoder"]

    @property
    def decoder(self) -> ComponentResult | None:
        return self.components.get("decoder")

    @property
    def cross(self) -> ComponentResult | None:
        return self.components.get("cross")

    def layer_table(self, component: str = "encoder") -> list[dict[str, float]]:
        return self.components[component].layer_table()

    # ---- tabular export

    def to_columns(self) -> dict[str, Any]:
        """Long format, one row per (component, layer, head, example, real query): numpy columns."""
        import numpy as np

        cols: dict[str, list] = {
            k: [] for k in ("component", "layer", "head", "example", "query", *QUERY_METRICS)
        }
        for name, comp in self.components.items():
            L, H, B, Q = comp.relative_deviation.shape
            mask = comp.query_mask[None, None].expand(L, H, B, Q)
            idx = mask.nonzero()
            cols["component"].append(np.full(idx.shape[0], name, dtype=object))
            for j, key in enumerate(("layer", "head", "example", "query")):
                cols[key].append(idx[:, j].numpy())
            for metric in QUERY_METRICS:
                x = comp.metrics.get(metric)
                cols[metric].append(x[mask].numpy() if x is not None else np.full(idx.shape[0], np.nan))
        return {k: (np.concatenate(v) if v else np.array([])) for k, v in cols.items()}

    def to_records(self) -> list[dict[str, Any]]:
        """Long format as a list of dicts (see :meth:`to_columns`)."""
        cols = self.to_columns()
        keys = list(cols)
        n = len(cols["layer"])
        return [
            {k: (cols[k][i].item() if hasattr(cols[k][i], "item") else cols[k][i]) for k in keys}
            for i in range(n)
        ]

    def to_pandas(self):
        """Long format as a ``pandas.DataFrame`` (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as e:  # pragma: no cover - pandas is optional
            raise ImportError("to_pandas() needs pandas: pip install pandas") from e
        return pd.DataFrame(self.to_columns())

    # ---- persistence

    def summary_dict(self) -> dict[str, Any]:
        """JSON-ready metadata and per-layer / per-head summaries (no per-query data)."""
        comps = {}
        for name, comp in self.components.items():
            comps[name] = {
                "shape": list(comp.relative_deviation.shape),
                "layers": _jsonable(comp.layer_table()),
                "head_mean_relative_deviation": _jsonable(comp.head_means().tolist()),
                "head_mean_output_deviation": _jsonable(comp.head_means("output_deviation").tolist()),
                "head_metrics": {k: _jsonable(v.tolist()) for k, v in comp.head_metrics.items()},
            }
        return {
            "model_name": self.model_name,
            "model_type": self.model_type,
            "alpha": self.alpha,
            "tol": self.tol,
            "examples": self.examples,
            "meta": _jsonable(self.meta),
            "components": comps,
        }

    def save(self, directory: str | Path, raw: bool = True) -> dict[str, Path]:
        """Writes ``results.safetensors`` (every per-query and per-head tensor; skipped when `raw` is
        False) and ``results.json`` (metadata and summaries) into `directory`. Returns the paths."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, comp in self.components.items():
            for k, v in comp.metrics.items():
                tensors[f"{name}.{k}"] = v.contiguous()
            for k, v in comp.head_metrics.items():
                tensors[f"{name}.{k}"] = v.contiguous()
            tensors[f"{name}.query_mask"] = comp.query_mask.contiguous()
        paths = {"json": directory / "results.json"}
        if raw:
            paths["safetensors"] = directory / "results.safetensors"
            save_file(tensors, str(paths["safetensors"]), metadata={"format": "hf_eot.analysis/1"})
        paths["json"].write_text(json.dumps(self.summary_dict(), indent=1, allow_nan=False) + "\n")
        return paths

    @classmethod
    def load(cls, directory: str | Path) -> AnalysisResult:
        """Reads what :meth:`save` wrote."""
        from safetensors.torch import load_file

        directory = Path(directory)
        summary = json.loads((directory / "results.json").read_text())
        tensors = load_file(str(directory / "results.safetensors"))
        components = {}
        for name in summary["components"]:
            components[name] = ComponentResult(
                name=name,
                metrics={k: tensors[f"{name}.{k}"] for k in QUERY_METRICS if f"{name}.{k}" in tensors},
                head_metrics={k: tensors[f"{name}.{k}"] for k in HEAD_METRICS if f"{name}.{k}" in tensors},
                query_mask=tensors[f"{name}.query_mask"],
            )
        return cls(
            model_name=summary["model_name"],
            model_type=summary["model_type"],
            alpha=summary["alpha"],
            tol=summary["tol"],
            components=components,
            examples=summary.get("examples"),
            meta=summary.get("meta", {}),
        )


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
