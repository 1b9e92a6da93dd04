"""Backtracking (Armijo) line search for a batch of independent ascent problems. Pure torch."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["ARMIJO", "MAX_HALVINGS", "backtrack"]

ARMIJO = 1e-4  # sufficient-increase constant c1
MAX_HALVINGS = 40


def backtrack(
    current: tuple[torch.Tensor, ...],
    slope: torch.Tensor,
    slack: torch.Tensor,
    evaluate: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
    pending: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """The first step size t in 1, 1/2, 1/4, ... with  g(x + t s) >= g(x) + ARMIJO t slope - slack.

    Args:
        current: ``(g(x), *extras)``, each ``(N,)``: the value at the current points and per-problem extras
            that `evaluate` also returns (e.g. a round-off bound).
        slope: ``(N,)`` directional derivative of g along the step (> 0 for an ascent direction).
        slack: ``(N,)`` a change of g below this is round-off: accept.
        evaluate: ``t (N,) -> (g(x + t s), *extras)`` for every problem.
        pending: ``(N,)`` bool, the problems that take a step.

    Returns:
        ``t (N,)``, ``accepted (N,)`` bool (False where no step size was accepted or not pending), and
        `current` updated at the accepted problems.
    """
    t = torch.ones_like(current[0])
    accepted = torch.zeros_like(pending)
    pending = pending.clone()
    for _ in range(MAX_HALVINGS):
        if not bool(pending.any()):
            break
        trial = evaluate(t)
        ok = pending & (trial[0] >= current[0] + ARMIJO * t * slope - slack)
        current = tuple(torch.where(ok, new, old) for new, old in zip(trial, current, strict=True))
        accepted |= ok
        pending &= ~ok
        t = torch.where(pending, 0.5 * t, t)
    return t, accepted, current
