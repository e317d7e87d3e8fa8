"""Evaluation: metrics, reports and image grids for the built-in tasks."""

from __future__ import annotations

import json
import math
from typing import Any


def report_json(obj: Any) -> str:
    """Strict JSON of a report: NaN / inf (a metric that was not measured) become null, never bare `NaN`,
    which json.dumps writes by default and strict parsers (browsers, jq, MLflow's UI) reject."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), indent=2, allow_nan=False) + "\n"
