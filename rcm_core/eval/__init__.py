"""Evaluation: metrics, reports and image grids for the built-in tasks."""

from __future__ import annotations

import json
import math
from typing import Any


def report_json(obj: Any) -> str:
    """Strict JSON of a report (json.dumps writes bare NaN / Infinity, which strict parsers such as browsers, jq
    and MLflow's UI reject): NaN, a metric that was not measured, becomes null; +-inf, a measured divergence
    (e.g. the 2-D sliced W2 of a sampler that blew up), becomes the string "inf" / "-inf"."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, float) and math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), indent=2, allow_nan=False) + "\n"
