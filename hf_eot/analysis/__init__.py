"""Analysis of pretrained attention heads through the Fenchel dual of paper 003 and the one-sided EOT view
of paper 000.

* :func:`fenchel_dual` solves the dual problem (7) exactly (Newton, batched, float64);
* :mod:`~hf_eot.analysis.mapping` maps BERT, ViT and T5 attention to (t, z, u) with forward hooks;
* :func:`eot_certificates` and :func:`policy_gradient_check` evaluate the EOT identities of attention rows;
* :func:`analyze` runs all of it over a model and inputs and returns an :class:`AnalysisResult`;
* figures (:mod:`~hf_eot.analysis.plots`, needs matplotlib) and a Markdown report
  (:mod:`~hf_eot.analysis.report`) sit on top; ``hf-eot analyze`` is the command line.

The solver, the EOT functions and the mapping import no Transformers module (the mapping reads the
attention modules of the model it is given); matplotlib is imported only by :mod:`~hf_eot.analysis.plots`.
"""

from .analyze import HEAD_METRICS, QUERY_METRICS, AnalysisInputError, AnalysisResult, ComponentResult, analyze
from .dual import DualSettings, FenchelDualResult, fenchel_dual, second_order_approximation
from .objective import dual_objective
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
