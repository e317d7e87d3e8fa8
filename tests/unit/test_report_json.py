"""Reports are strict JSON: unmeasured metrics (NaN / inf) are written as null."""

import json
import math

from rcm_core.eval import report_json
from rcm_core.eval.shapes import format_table


def _strict(text: str):
    def reject(name):
        raise ValueError(f"non-JSON constant {name}")

    return json.loads(text, parse_constant=reject)


def test_nan_becomes_null_and_infinity_a_string_everywhere():
    rows = [{"model": "teacher", "overall": 0.9, "diversity": math.nan, "nested": [math.inf, {"x": -math.inf}]}]
    out = _strict(report_json({"rows": rows, "step": 3}))
    assert out == {
        "rows": [{"model": "teacher", "overall": 0.9, "diversity": None, "nested": ["inf", {"x": "-inf"}]}],
        "step": 3,
    }


def test_table_shows_unmeasured_cells_as_dashes():
    row = {
        "model": "teacher (stored)",
        "steps": 50,
        "overall": 0.916,
        "held_out": 0.89,
        "diversity": math.nan,
        "recall": None,
        "ms_per_image": math.nan,
        "single_object": 1.0,
    }
    line = format_table([row]).splitlines()[-1]
    assert line.startswith("| teacher (stored) | 50 | 0.916 | 1.00 | - |") and line.endswith("| 0.89 | - | - | - |")
