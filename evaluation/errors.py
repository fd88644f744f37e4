"""The evaluation's one-line errors: the CLIs print them as `error: <message>` and exit 2."""

from __future__ import annotations

from launch.runtime.errors import UserError


class EvaluationError(UserError):
    """Unusable arguments or inputs for an evaluation; the message is one line."""


class MetricError(EvaluationError):
    """Statistics that cannot give a metric (NaN/Inf, too few images); the message is one line."""
