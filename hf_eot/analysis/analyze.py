"""Analyse every head of a pretrained model: lambda* against alpha z, EOT certificates, policy gradients.

:func:`analyze` runs the model on a batch of inputs with hooks on its attention modules
(:mod:`hf_eot.analysis.mapping`), poses the dual problem (7) of "Deciphering Attention Mechanisms:
Optimization and Fenchel Dual Solutions" (anonymous, under review; no arXiv id) for every layer, head and
query, solves it exactly (:func:`hf_eot.analysis.dual.fenchel_dual`) and records, per query
(:data:`hf_eot.analysis.results.QUERY_METRICS`):

* ``relative_deviation`` ||lambda* - alpha z|| / ||lambda*|| (the paper's Fig. 4-8) under the paper's
  split of the score scale, and ``relative_deviation_<split>`` under the other splits
  (:data:`hf_eot.analysis.mapping.SPLITS`): the attention is the same, the dual problem is not;
* ``second_order_deviation`` ||lambda* - lambda_2|| / ||lambda*|| for eq. (13)'s
  lambda_2 = alpha (I + alpha Sigma)^-1 z;
* ``output_deviation`` ||o(lambda*) - o(alpha z)|| / sqrt(E_p ||v||^2): how far the head's output
  o = sum_i p_i v_i (value bias included) moves between the exact and the approximate solution, relative
  to the size of the value vectors it averages (p = the attention row; dividing by ||o|| instead blows up
  where the values nearly cancel);
* ``weights_tv`` the total-variation distance 1/2 ||p* - p(alpha z)||_1 between the two attention rows;
* ``n_iters``, ``rel_grad_norm`` of the solver;
* the EOT certificates of the attention row the model actually computed (:mod:`hf_eot.analysis.eot`):
  ``primal``, ``dual``, ``gap``, ``entropy``, ``fisher_top_eig``, ``fisher_eff_rank``;

and, per layer and head, ``mapping_error`` (max |eq. 16 at lambda = alpha z - the model's weights|) and
``pg_residual`` (relative residual of the policy-gradient identity for the chosen loss).

Per-query tensors are indexed ``[layer, head, example, query]``, NaN at padded queries. Under
``accelerate launch`` the examples are split across processes and the results gathered on every one.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import CONFIG_KEY, EOTAttentionConfig
from .dual import DualSettings, fenchel_dual
from .eot import eot_certificates, policy_gradient_check
from .mapping import (
    COMPONENTS,
    SPLITS,
    attention_sites,
    capture_attention,
    dual_problems,
    get_architecture,
    softmax_epsilon,
)
from .results import HEAD_METRICS, QUERY_METRICS, AnalysisResult, ComponentResult

__all__ = ["AnalysisInputError", "AnalysisResult", "ComponentResult", "HEAD_METRICS", "QUERY_METRICS", "analyze"]

_SOFTMAX_KERNELS_WITHOUT_WEIGHTS = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
_DECODER_KEYS = ("decoder_input_ids", "decoder_attention_mask")


class AnalysisInputError(ValueError):
    """The inputs cannot be analysed (empty, inconsistent, or longer than the model's maximum)."""


# --------------------------------------------------------------------------------------------------
# the driver


@dataclass
class _Run:
    """What every mini-batch of one analysis shares."""

    alpha: float
    settings: DualSettings
    loss: Callable[[torch.Tensor], torch.Tensor] | None
    stats: dict[str, float]
    epsilon: dict[str, float]  # site name -> softmax temperature the layer runs with


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


def _solve(pr, t: torch.Tensor, z: torch.Tensor, run: _Run, second_order: bool):
    """fenchel_dual for one site: the user's alpha is the paper's alpha at epsilon = 1, so the problem has
    alpha_eff = alpha * pr.alpha and evidence z / alpha (the attention alpha_eff <t, z / alpha> is unchanged)."""
    z = z if run.alpha == 1.0 else z / run.alpha
    return fenchel_dual(
        t, z, log_u=pr.log_u, alpha=run.alpha * pr.alpha, settings=run.settings, second_order=second_order
    )


def _analyze_batch(capture, batch, run: _Run) -> dict[str, dict[str, Any]]:
    """Per component: metrics ``(L, H, b, Q)``, head metrics ``(L, H)``, query mask ``(b, Q)``."""
    stats = run.stats
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
        pr = dual_problems(site, call, epsilon=run.epsilon[site.name])
        for name, x in (("inputs", pr.t), ("queries", pr.z), ("position bias", pr.log_prior)):
            if x is not None and bool(torch.isnan(x).any() | (x == math.inf).any()):
                raise AnalysisInputError(
                    f"{site.name}: the attention {name} contain NaN or inf (does the model have non-finite "
                    "weights, or did the forward pass overflow?); nothing to analyse"
                )
        res = _solve(pr, pr.t, pr.z, run, second_order=True)
        deviations = {"relative_deviation": res.relative_deviation}
        solved = {pr.template_scale("paper"): res.relative_deviation}
        for split in SPLITS:
            if split == "paper":
                continue
            scale = pr.template_scale(split)
            known = next((v for k, v in solved.items() if math.isclose(k, scale, rel_tol=1e-12)), None)
            if known is None:
                known = _solve(pr, *pr.split(split), run, second_order=False).relative_deviation
                solved[scale] = known
            deviations[f"relative_deviation_{split}"] = known
        stats["solver_s"] += time.perf_counter() - t0
        qmask = qmasks[site.component].to(res.n_iters.device)  # (B, Q)
        real = qmask[:, None, :].expand_as(res.n_iters)
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
        cert = eot_certificates(rows, pr.scores, epsilon=pr.epsilon, log_prior=pr.log_prior, mask=pr.valid)
        pg = policy_gradient_check(
            pr.scores,
            values,
            epsilon=pr.epsilon,
            log_prior=pr.log_prior,
            mask=pr.valid.expand_as(pr.scores),
            loss=run.loss,
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
            **deviations,
            "second_order_deviation": res.second_order_deviation,
            "output_deviation": out_dev,
            "weights_tv": tv,
            "n_iters": res.n_iters.to(torch.float64),
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
            "epsilon": pr.alpha**-1,
        }
    out = {}
    for comp, layers in per_comp.items():
        order = sorted(layers)
        out[comp] = {
            "metrics": {k: torch.stack([layers[i][k] for i in order]) for k in QUERY_METRICS},
            "head_metrics": {k: torch.stack([layers[i][k] for i in order]) for k in HEAD_METRICS},
            "query_mask": qmasks[comp],
            "epsilon": [layers[i]["epsilon"] for i in order],
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


def _run_shard(model, inputs, n, batch_size, run: _Run, progress: bool, desc: str, output_attentions: bool):
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
            if output_attentions:  # hf_eot's attention returns its weights only when asked
                kwargs["output_attentions"] = True
            with torch.no_grad():
                model(**kwargs)
            run.stats["forward_s"] += time.perf_counter() - t0
            # the policy-gradient check needs autograd; it runs inside _analyze_batch under enable_grad
            with torch.no_grad():
                parts.append(_analyze_batch(capture, batch, run))
            capture.clear()
            if bar is not None:
                bar.update(min(batch_size, n - start))
    if bar is not None:
        bar.close()
    return parts


def _configured(model: nn.Module) -> bool:
    """The model's config asks hf_eot for something other than plain softmax (epsilon = 1) somewhere."""
    raw = getattr(model.config, CONFIG_KEY, None)
    if raw is None:
        return False
    specs = EOTAttentionConfig.from_dict(raw).specs()
    return not all(s.regularizer == "softmax" and s.runs_on_sdpa and s.params["epsilon"] == 1.0 for s in specs)


def analyze(
    model: nn.Module,
    inputs: Mapping[str, Any],
    *,
    alpha: float = 1.0,
    tol: float = 1e-8,
    max_iters: int = 100,
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
            :func:`hf_eot.analysis.mapping.supported_model_types`), with plain softmax attention or
            hf_eot's softmax at any temperature epsilon (analysed with alpha / epsilon); other hf_eot
            regularizers are refused (ValueError), as their weights are not the softmax of eq. (16).
        inputs: batched model inputs, e.g. a tokenizer's output (``input_ids``, ``attention_mask``, ...),
            ``pixel_values`` for ViT, and for T5 encoder-decoders ``decoder_input_ids`` /
            ``decoder_attention_mask`` or ``labels``.
        alpha: strength of the evidence term at epsilon = 1. The paper's mapping fixes alpha = 1; another
            value keeps the attention unchanged (z is rescaled to z / alpha) and changes the dual problem.
        tol, max_iters: the solver's relative gradient tolerance and Newton iteration cap.
        batch_size: examples per forward pass.
        loss: scalar loss of the head outputs ``(B, H, Q, d')`` for the policy-gradient check
            (default 0.5 * ||o||^2).
        attn_implementation: ``"auto"`` runs hf_eot-configured models (anything but softmax with
            epsilon = 1) with ``"eot"``, switches softmax kernels that return no weights (sdpa, flash) to
            ``"eager"`` (same function, and the weights become available for the mapping check and the
            certificates) and keeps any other implementation; a name forces it; None keeps the model's.
            The model's setting is restored afterwards.
        distributed: split the examples across ``accelerate`` processes and gather the results; default:
            when more than one process is running.
        progress: show a tqdm progress bar (main process only).
        model_name: label stored in the result.
        examples: labels of the examples (e.g. the sentences), stored in the result.
    """
    spec = get_architecture(model)  # fails early for unsupported model types
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    settings = DualSettings(tol=tol, max_iters=max_iters, return_lam=False, warn=False)
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
        if _configured(model):
            target = "eot"
        elif previous_impl in _SOFTMAX_KERNELS_WITHOUT_WEIGHTS or previous_impl is None:
            target = "eager"
        else:
            target = None
    was_training = model.training
    run = _Run(
        alpha=float(alpha),
        settings=settings,
        loss=loss,
        stats={"forward_s": 0.0, "solver_s": 0.0, "certificates_s": 0.0, "problems": 0, "not_converged": 0},
        epsilon={},
    )
    t_start = time.perf_counter()
    try:
        if target is not None and target != previous_impl:
            model.set_attn_implementation(target)
        output_attentions = (target or previous_impl) == "eot"
        # what each layer runs, before any forward pass: refuses non-softmax layers
        run.epsilon = {s.name: softmax_epsilon(s.module, s.component, s.layer) for s in attention_sites(model)}
        model.eval()
        desc = model_name or type(model).__name__
        if distributed and state.num_processes > 1:
            from accelerate.utils import gather_object

            with state.split_between_processes(list(range(n))) as shard:
                shard_inputs = _select(inputs, shard) if shard else None
                show = progress and state.is_main_process
                parts = (
                    _run_shard(model, shard_inputs, len(shard), batch_size, run, show, desc, output_attentions)
                    if shard
                    else []
                )
            gathered = gather_object([(state.process_index, parts, run.stats)])
            gathered = sorted(gathered, key=lambda x: x[0])
            parts = [p for _, ps, _ in gathered for p in ps]
            stats = {k: sum(s[k] for _, _, s in gathered) for k in run.stats}
            stats["processes"] = state.num_processes
        else:
            parts = _run_shard(model, inputs, n, batch_size, run, progress, desc, output_attentions)
            stats = dict(run.stats)
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
            f"in max_iters={max_iters} Newton iterations; their deviations are approximate (see "
            "metrics['rel_grad_norm']). Raise max_iters or loosen tol.",
            RuntimeWarning,
            stacklevel=2,
        )
    import transformers

    epsilon = {}
    for part in parts:
        for name, comp in part.items():
            epsilon.setdefault(name, comp["epsilon"])
    meta = {
        **stats,
        "num_examples": n,
        "attn_implementation": target or previous_impl,
        "architecture": type(model).__name__,
        "attention_class": spec.attention_class,
        "epsilon": epsilon,
        "splits": dict(SPLITS),
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
