"""Warnings that point at the user's code rather than at library internals."""

from __future__ import annotations

import os
import sys
import warnings

__all__ = ["user_stacklevel", "warn"]


def user_stacklevel(skip: int = 1) -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` called ``skip`` frames below this call) of the first
    caller outside hf_eot, Transformers, PEFT, accelerate and torch."""
    roots = tuple(
        os.path.dirname(os.path.abspath(module.__file__)) + os.sep
        for name in ("hf_eot", "transformers", "peft", "accelerate", "torch")
        if (module := sys.modules.get(name)) is not None and getattr(module, "__file__", None)
    )
    frame, level = sys._getframe(skip + 1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(roots):
        frame, level = frame.f_back, level + 1
    return level


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside the libraries (see :func:`user_stacklevel`)."""
    warnings.warn(message, category, stacklevel=user_stacklevel(skip=1) + 1)
