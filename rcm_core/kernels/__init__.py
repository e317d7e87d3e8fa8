"""Triton kernels. Importing this package needs triton; the rest of rcm_core does not.

NOTE: the re-exported function `attention_jvp` shadows the submodule of the same name as an attribute of this
package; `from rcm_core.kernels.attention_jvp import X` still works, and
`importlib.import_module("rcm_core.kernels.attention_jvp")` returns the module.
"""

from rcm_core.kernels.attention_jvp import (
    attention,
    attention_backward,
    attention_forward,
    attention_jvp,
    attention_jvp_forward,
    attention_jvp_ref,
    attention_tangent_forward,
)

__all__ = [
    "attention",
    "attention_backward",
    "attention_forward",
    "attention_jvp",
    "attention_jvp_forward",
    "attention_jvp_ref",
    "attention_tangent_forward",
]
