"""Analysis of pretrained attention heads through the Fenchel dual of "Deciphering Attention Mechanisms:
Optimization and Fenchel Dual Solutions" (anonymous, under review; no arXiv id) and the one-sided EOT view
of "Scaled-Dot-Product Attention as One-Sided Entropic Optimal Transport" (Litman, arXiv:2508.08369).

* :func:`fenchel_dual` solves the dual problem (7) exactly (Newton, batched, float64; options in
  :class:`DualSettings`); :func:`second_order_approximation` is eq. (13);
* the solver's parts: :mod:`~hf_eot.analysis.objective` (g and its gradient), :mod:`~hf_eot.analysis.newton`
  (Newton steps and their linear systems), :mod:`~hf_eot.analysis.line_search`;
  :mod:`~hf_eot.analysis.reference` holds reference solvers for tests and benchmarks;
* :mod:`~hf_eot.analysis.mapping` maps BERT, ViT and T5 attention to (t, z, u) with forward hooks (the
  architecture registry);
* :func:`eot_certificates` and :func:`policy_gradient_check` evaluate the EOT identities of attention rows;
* :func:`analyze` runs all of it over a model and inputs and returns an :class:`AnalysisResult`
  (:mod:`~hf_eot.analysis.results`);
* figures (:mod:`~hf_eot.analysis.plots`, needs matplotlib) and a Markdown report
  (:mod:`~hf_eot.analysis.report`) sit on top; ``hf-eot analyze`` is the command line.

The solver, the EOT functions and the mapping import no Transformers module (the mapping reads the
attention modules of the model it is given); matplotlib is imported only by :mod:`~hf_eot.analysis.plots`.
"""

from .analyze import HEAD_METRICS, QUERY_METRICS, AnalysisInputError, AnalysisResult, ComponentResult, analyze
from .dual import DualSettings, FenchelDualResult, fenchel_dual, second_order_approximation
from .eot import (
    EOTCertificates,
    PolicyGradientCheck,
    eot_certificates,
    fisher_information,
    policy_gradient_check,
)
from .mapping import (
    ArchitectureSpec,
    DualProblems,
    UnsupportedModelError,
    capture_attention,
    dual_problems,
    register_architecture,
    supported_model_types,
)
from .objective import dual_objective
from .report import write_report

__all__ = [
    "HEAD_METRICS",
    "QUERY_METRICS",
    "AnalysisInputError",
    "AnalysisResult",
    "ArchitectureSpec",
    "ComponentResult",
    "DualProblems",
    "DualSettings",
    "EOTCertificates",
    "FenchelDualResult",
    "PolicyGradientCheck",
    "UnsupportedModelError",
    "analyze",
    "capture_attention",
    "dual_objective",
    "dual_problems",
    "eot_certificates",
    "fenchel_dual",
    "fisher_information",
    "policy_gradient_check",
    "second_order_approximation",
    "register_architecture",
    "supported_model_types",
    "write_report",
]
