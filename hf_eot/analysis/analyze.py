"""Analyse every head of a pretrained model: lambda* against alpha z, EOT certificates, policy gradients.

:func:`analyze` runs the model on a batch of inputs with hooks on its attention modules
(:mod:`hf_eot.analysis.mapping`), poses the dual problem (7) for every layer, head and query, solves it
exactly (:func:`hf_eot.analysis.dual.fenchel_dual`) and records, per query:

* ``relative_deviation`` ||lambda* - alpha z|| / ||lambda*|| (the paper's Fig. 4-8);
* ``output_deviation`` ||o(lambda*) - o(alpha z)|| / sqrt(E_p ||v||^2): how far the head's output
  o = sum_i p_i v_i (value bias included) moves between the exact and the approximate solution, relative
  to the size of the value vectors it averages (p = the attention row; dividing by ||o|| instead blows up
  where the values nearly cancel);
* ``weights_tv`` the total-variation distance 1/2 ||p* - p(alpha z)||_1 between the two attention rows;
* ``n_iter``, ``rel_grad_norm`` of the solver;
* the EOT certificates of the attention row the model actually computed (:mod:`hf_eot.analysis.eot`):
  ``primal``, ``dual``, ``gap``, ``entropy``, ``fisher_top_eig``, ``fisher_eff_rank``;

and, per layer and head, ``mapping_error`` (max |eq. 16 at lambda = alpha z - the model's weights|) and
``pg_residual`` (relative residual of the policy-gradient identity for the chosen loss).

Per-query tensors are indexed ``[layer, head, example, query]``, NaN at padded queries. Under
``accelerate launch`` the examples are split across processes and the results gathered on every one.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .dual import fenchel_dual
from .eot import eot_certificates, policy_gradient_check
from .mapping import COMPONENTS, capture_attention, dual_problems, get_architecture

__all__ = [
    "AnalysisInputError",
    "AnalysisResult",
    "ComponentResult",
    "HEAD_METRICS",
    "QUERY_METRICS",
    "analyze",
]

QUERY_METRICS = (
    "relative_deviation",
    "output_deviation",
    "weights_tv",
    "n_iter",
    "rel_grad_norm",
    "primal",
    "dual",
    "gap",
    "entropy",
    "fisher_top_eig",
    "fisher_eff_rank",
)
HEAD_METRICS = ("mapping_error", "pg_residual")
COMPONENT_TITLES = {
    "encoder": "encoder self-attention",
    "decoder": "decoder self-attention",
    "cross": "cross-attention",
}
_SOFTMAX_KERNELS_WITHOUT_WEIGHTS = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
_DECODER_KEYS = ("decoder_input_ids", "decoder_attention_mask")


class AnalysisInputError(ValueError):
    """The inputs cannot be analysed (empty, inconsistent, or longer than the model's maximum)."""


# --------------------------------------------------------------------------------------------------
# result containers


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
        """The finite values of a per-query metric, optionally for one layer and/or head (1-D)."""
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
                    "output_mean": _stat(out, "mean"),
                    "output_max": _stat(out, "max"),
                    "weights_tv_mean": _stat(self.values("weights_tv", layer).double(), "mean"),
                    "newton_iters_mean": _stat(self.values("n_iter", layer).double(), "mean"),
                    "newton_iters_max": _stat(self.values("n_iter", layer).double(), "max"),
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
        alpha, tol: the dual problem's alpha and the solver's tolerance.
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
                cols[metric].append(comp.metrics[metric][mask].numpy())
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
                metrics={k: tensors[f"{name}.{k}"] for k in QUERY_METRICS},
                head_metrics={k: tensors[f"{name}.{k}"] for k in HEAD_METRICS},
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


# --------------------------------------------------------------------------------------------------
# the driver


def _batch_size_of(inputs: Mapping[str, Any]) -> int:
    sizes = {k: v.shape[0] for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    if not sizes:
        raise AnalysisInputError(
            "inputs hold no tensors (expected input_ids / pixel_values with a batch dim)"
        )
    if len(set(sizes.values())) != 1:
        raise AnalysisInputError(f"inputs disagree on the batch size: {sizes}")
    return next(iter(sizes.values()))


def _select(inputs: Mapping[str, Any], index: Sequence[int] | slice) -> dict[str, Any]:
    if isinstance(index, slice):
        return {k: v[index] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    idx = torch.as_tensor(list(index), dtype=torch.long)
    return {k: v[idx] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _trim(batch: dict[str, Any], keys: tuple[str, ...], mask_key: str) -> None:
    """Drops trailing columns that are padding in every example of the mini-batch."""
    mask = batch.get(mask_key)
    if mask is None or mask.dim() != 2 or mask.shape[1] == 0:
        return
    cols = mask.bool().any(0).nonzero()
    last = int(cols.max()) + 1 if cols.numel() else 1
    for k in keys:
        if k in batch and isinstance(batch[k], torch.Tensor) and batch[k].dim() >= 2:
            batch[k] = batch[k][:, :last]


def _prepare_inputs(model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
    inputs = dict(inputs)
    config = model.config
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" not in inputs:
        labels = inputs.pop("labels", None)
        if labels is None:
            raise AnalysisInputError(
                f"{type(model).__name__} is an encoder-decoder: pass decoder_input_ids (and "
                "decoder_attention_mask) or labels"
            )
        inputs["decoder_attention_mask"] = (labels != -100).long()
        inputs["decoder_input_ids"] = model._shift_right(
            labels.masked_fill(labels == -100, config.pad_token_id)
        )
    inputs.pop("labels", None)
    return inputs


def _check_lengths(model: nn.Module, inputs: Mapping[str, Any]) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    ids = inputs.get("input_ids")
    if limit is not None and ids is not None:
        mask = inputs.get("attention_mask")
        length = int(mask.sum(-1).max()) if mask is not None and mask.numel() else ids.shape[-1]
        if length > limit:
            raise AnalysisInputError(
                f"an input has {length} tokens, more than the model's maximum of {limit} "
                "(max_position_embeddings); shorten or truncate the inputs"
            )
    pix = inputs.get("pixel_values")
    size = getattr(model.config, "image_size", None)
    if pix is not None and size is not None:
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        if tuple(pix.shape[-2:]) != size:
            raise AnalysisInputError(f"images are {tuple(pix.shape[-2:])}, the model expects {size}")


def _query_masks(batch: Mapping[str, Any], calls: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """(B, Q) real-query masks per component, from the inputs' attention masks."""
    out = {}
    for comp, (B, Q) in calls.items():
        key = "attention_mask" if comp == "encoder" else "decoder_attention_mask"
        m = batch.get(key)
        if m is not None and m.dim() == 2 and m.shape[1] == Q:
            out[comp] = m.bool().cpu()
        else:
            out[comp] = torch.ones(B, Q, dtype=torch.bool)
    return out


def _analyze_batch(
    capture, batch, alpha: float, tol: float, max_iter: int, loss, stats: dict[str, float]
) -> dict[str, dict[str, Any]]:
    """Per component: metrics ``(L, H, b, Q)``, head metrics ``(L, H)``, query mask ``(b, Q)``."""
    shapes = {}
    for site in capture.sites:
        calls = capture.calls[site.name]
        if len(calls) != 1:
            raise RuntimeError(f"{site.name} ran {len(calls)} times in one forward pass; expected once")
        shapes[site.component] = tuple(calls[0].hidden.shape[:2])
    qmasks = _query_masks(batch, shapes)
    per_comp: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for site in capture.sites:
        call = capture.calls[site.name][0]
        t0 = time.perf_counter()
        pr = dual_problems(site, call)
        # the mapping has alpha = 1; another alpha keeps the attention (alpha * z/alpha = z) and
        # changes the dual problem
        z = pr.z if alpha == pr.alpha else pr.z * (pr.alpha / alpha)
        res = fenchel_dual(
            pr.t, z, log_u=pr.log_u, alpha=alpha, tol=tol, max_iter=max_iter, return_lam=False, warn=False
        )
        stats["solver_s"] += time.perf_counter() - t0
        qmask = qmasks[site.component].to(res.n_iter.device)  # (B, Q)
        real = qmask[:, None, :].expand_as(res.n_iter)
        stats["problems"] += int(real.sum())
        stats["not_converged"] += int((~res.converged & real).sum())
        t0 = time.perf_counter()
        p_az = pr.attention()
        values = pr.values
        o_star = res.weights @ values
        o_az = p_az @ values
        v_rms = (p_az * (values * values).sum(-1).unsqueeze(-2)).sum(-1).sqrt()  # sqrt(E_p ||v||^2)
        out_dev = (o_star - o_az).norm(dim=-1) / v_rms
        tv = 0.5 * (res.weights - p_az).abs().sum(-1)
        rows = pr.model_weights if pr.model_weights is not None else p_az
        cert = eot_certificates(rows, pr.scores, eps=pr.eps, log_prior=pr.log_prior, mask=pr.valid)
        pg = policy_gradient_check(
            pr.scores,
            values,
            eps=pr.eps,
            log_prior=pr.log_prior,
            mask=pr.valid.expand_as(pr.scores),
            loss=loss,
        )
        stats["certificates_s"] += time.perf_counter() - t0
        realk = real[..., None]
        diff = (pg.grad_autograd - pg.grad_policy).abs().masked_fill(~realk, 0).amax(dim=(0, 2, 3))
        scale = pg.grad_autograd.abs().masked_fill(~realk, 0).amax(dim=(0, 2, 3))
        pg_res = diff / scale.clamp_min(torch.finfo(scale.dtype).tiny)
        if pr.model_weights is not None:
            map_err = (p_az - pr.model_weights).abs().masked_fill(~realk, 0).amax(dim=(0, 2, 3))
        else:
            map_err = torch.full((pr.z.shape[1],), math.nan, dtype=torch.float64, device=pr.z.device)
        nan = torch.tensor(math.nan, dtype=torch.float32, device=pr.z.device)
        metrics = {
            "relative_deviation": res.relative_deviation,
            "output_deviation": out_dev,
            "weights_tv": tv,
            "n_iter": res.n_iter.to(torch.float64),
            "rel_grad_norm": res.rel_grad_norm,
            "primal": cert.primal,
            "dual": cert.dual,
            "gap": cert.gap,
            "entropy": cert.entropy,
            "fisher_top_eig": cert.fisher_top_eig,
            "fisher_eff_rank": cert.fisher_eff_rank,
        }
        # (B, H, Q) -> (H, B, Q); stacking layers gives [layer, head, example, query]
        metrics = {
            k: torch.where(real, v.to(torch.float32), nan).transpose(0, 1).cpu() for k, v in metrics.items()
        }
        per_comp.setdefault(site.component, {})[site.layer] = {
            **metrics,
            "mapping_error": map_err.cpu(),
            "pg_residual": pg_res.cpu(),
        }
    out = {}
    for comp, layers in per_comp.items():
        order = sorted(layers)
        out[comp] = {
            "metrics": {k: torch.stack([layers[i][k] for i in order]) for k in QUERY_METRICS},
            "head_metrics": {k: torch.stack([layers[i][k] for i in order]) for k in HEAD_METRICS},
            "query_mask": qmasks[comp],
        }
    return out


def _merge(parts: list[dict[str, dict[str, Any]]]) -> dict[str, ComponentResult]:
    """Concatenates mini-batch results along the example axis, padding queries with NaN."""
    comps: dict[str, ComponentResult] = {}
    names = [c for c in COMPONENTS if any(c in p for p in parts)]
    for name in names:
        chunks = [p[name] for p in parts if name in p]
        Q = max(c["query_mask"].shape[1] for c in chunks)

        def pad(x, value, Q=Q):
            extra = Q - x.shape[-1]
            if extra == 0:
                return x
            return torch.cat([x, torch.full((*x.shape[:-1], extra), value, dtype=x.dtype)], dim=-1)

        metrics = {
            k: torch.cat([pad(c["metrics"][k], math.nan) for c in chunks], dim=2) for k in QUERY_METRICS
        }
        head = {}
        for k in HEAD_METRICS:
            stacked = torch.stack([c["head_metrics"][k] for c in chunks])
            finite = torch.isfinite(stacked)
            best = torch.where(finite, stacked, torch.full_like(stacked, -math.inf)).amax(0)
            head[k] = torch.where(finite.any(0), best, torch.full_like(best, math.nan))
        qmask = torch.cat([pad(c["query_mask"], False) for c in chunks], dim=0)
        comps[name] = ComponentResult(name=name, metrics=metrics, head_metrics=head, query_mask=qmask)
    return comps


def process_state(model: nn.Module | None = None):
    """accelerate's process state. On a machine without an accelerator (or a model on the CPU) it is
    built with ``cpu=True``, which is what lets ``accelerate launch`` run several gloo processes."""
    from accelerate import PartialState

    on_cpu = not torch.cuda.is_available()
    if model is not None:
        try:
            on_cpu = on_cpu or next(model.parameters()).device.type == "cpu"
        except StopIteration:
            pass
    return PartialState(cpu=on_cpu)


def _run_shard(model, inputs, n, batch_size, alpha, tol, max_iter, loss, progress, desc, stats):
    parts = []
    device = next(model.parameters()).device
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=desc, unit="ex", leave=False)
    with capture_attention(model) as capture:
        for start in range(0, n, batch_size):
            batch = _select(inputs, slice(start, min(start + batch_size, n)))
            _trim(batch, _TEXT_KEYS, "attention_mask")
            _trim(batch, _DECODER_KEYS, "decoder_attention_mask")
            capture.clear()
            t0 = time.perf_counter()
            kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            if getattr(model.config, "is_encoder_decoder", False):
                kwargs["use_cache"] = False
            with torch.no_grad():
                model(**kwargs)
            stats["forward_s"] += time.perf_counter() - t0
            with torch.no_grad():
                part = _analyze_batch(capture, batch, alpha, tol, max_iter, loss, stats)
            # the policy-gradient check needs autograd; it runs inside _analyze_batch under enable_grad
            parts.append(part)
            capture.clear()
            if bar is not None:
                bar.update(min(batch_size, n - start))
    if bar is not None:
        bar.close()
    return parts


def analyze(
    model: nn.Module,
    inputs: Mapping[str, Any],
    *,
    alpha: float = 1.0,
    tol: float = 1e-8,
    max_iter: int = 100,
    batch_size: int = 16,
    loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    attn_implementation: str | None = "auto",
    distributed: bool | None = None,
    progress: bool = False,
    model_name: str | None = None,
    examples: Sequence[str] | None = None,
) -> AnalysisResult:
    """Solves the dual problem (7) for every layer, head and query of `model` on `inputs`.

    Args:
        model: a supported Transformers model (BERT, ViT, T5; see
            :func:`hf_eot.analysis.mapping.supported_model_types`).
        inputs: batched model inputs, e.g. a tokenizer's output (``input_ids``, ``attention_mask``, ...),
            ``pixel_values`` for ViT, and for T5 encoder-decoders ``decoder_input_ids`` /
            ``decoder_attention_mask`` or ``labels``.
        alpha: strength of the evidence term. The paper's mapping fixes alpha = 1; another value keeps
            the attention unchanged (z is rescaled to z / alpha) and changes the dual problem.
        tol, max_iter: the solver's relative gradient tolerance and iteration cap.
        batch_size: examples per forward pass.
        loss: scalar loss of the head outputs ``(B, H, Q, d')`` for the policy-gradient check
            (default 0.5 * ||o||^2).
        attn_implementation: ``"auto"`` switches softmax kernels that return no weights (sdpa, flash) to
            ``"eager"`` for the run (same function, and the weights become available for the mapping check
            and the certificates) and keeps any other implementation; a name forces it; None keeps the
            model's. The model's setting is restored afterwards.
        distributed: split the examples across ``accelerate`` processes and gather the results; default:
            when more than one process is running.
        progress: show a tqdm progress bar (main process only).
        model_name: label stored in the result.
        examples: labels of the examples (e.g. the sentences), stored in the result.
    """
    spec = get_architecture(model)  # fails early for unsupported model types
    if not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    inputs = _prepare_inputs(model, inputs)
    n = _batch_size_of(inputs)
    if n == 0:
        raise AnalysisInputError("no inputs to analyse (the batch is empty)")
    _check_lengths(model, inputs)
    if examples is not None and len(examples) != n:
        raise AnalysisInputError(f"{len(examples)} example labels for {n} inputs")

    state = process_state(model)
    if distributed is None:
        distributed = state.num_processes > 1
    previous_impl = getattr(model.config, "_attn_implementation", None)
    target = attn_implementation
    if target == "auto":
        target = (
            "eager" if (previous_impl in _SOFTMAX_KERNELS_WITHOUT_WEIGHTS or previous_impl is None) else None
        )
    was_training = model.training
    stats = {"forward_s": 0.0, "solver_s": 0.0, "certificates_s": 0.0, "problems": 0, "not_converged": 0}
    t_start = time.perf_counter()
    try:
        if target is not None and target != previous_impl:
            model.set_attn_implementation(target)
        model.eval()
        desc = model_name or type(model).__name__
        if distributed and state.num_processes > 1:
            from accelerate.utils import gather_object

            with state.split_between_processes(list(range(n))) as shard:
                shard_inputs = _select(inputs, shard) if shard else None
                parts = (
                    _run_shard(
                        model,
                        shard_inputs,
                        len(shard),
                        batch_size,
                        alpha,
                        tol,
                        max_iter,
                        loss,
                        progress and state.is_main_process,
                        desc,
                        stats,
                    )
                    if shard
                    else []
                )
            gathered = gather_object([(state.process_index, parts, stats)])
            gathered = sorted(gathered, key=lambda x: x[0])
            parts = [p for _, ps, _ in gathered for p in ps]
            stats = {k: sum(s[k] for _, _, s in gathered) for k in stats}
            stats["processes"] = state.num_processes
        else:
            parts = _run_shard(
                model, inputs, n, batch_size, alpha, tol, max_iter, loss, progress, desc, stats
            )
            stats["processes"] = 1
    finally:
        if target is not None and target != previous_impl and previous_impl is not None:
            model.set_attn_implementation(previous_impl)
        model.train(was_training)
    components = _merge(parts)
    stats["wall_s"] = time.perf_counter() - t_start
    if stats["not_converged"]:
        warnings.warn(
            f"analyze: {stats['not_converged']} of {stats['problems']} dual problems did not reach tol={tol:g} "
            f"in max_iter={max_iter} Newton iterations; their deviations are approximate (see "
            "metrics['rel_grad_norm']). Raise max_iter or loosen tol.",
            RuntimeWarning,
            stacklevel=2,
        )
    import transformers

    meta = {
        **stats,
        "num_examples": n,
        "attn_implementation": target or previous_impl,
        "architecture": type(model).__name__,
        "attention_class": spec.attention_class,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return AnalysisResult(
        model_name=model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        model_type=spec.model_type,
        alpha=float(alpha),
        tol=float(tol),
        components=components,
        examples=list(examples) if examples is not None else None,
        meta=meta,
    )
