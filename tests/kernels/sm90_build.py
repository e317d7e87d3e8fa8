"""Build the Gluon Hopper kernel for sm_90a offline (no GPU) and write its PTX and shared-memory size.

    python -m tests.kernels.sm90_build HEAD_DIM OUT_DIR [fused|tangent|primal]

Run as its own process: the kernel tests set TRITON_INTERPRET=1, under which Triton's standard-library
helpers (tl.max, ...) turn into interpreter objects that a real compile rejects.
"""

import json
import pathlib
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

from rcm_core.kernels import attention_jvp_sm90


def build(head_dim: int, mode: str = "fused"):
    if mode == "primal":
        fn = attention_jvp_sm90._primal_fwd_kernel
        block_n, stages = attention_jvp_sm90.PRIMAL_TILES[head_dim]
        consts = dict(HEAD_DIM=head_dim, BLOCK_N=block_n, STAGES=stages)
    else:
        fn = attention_jvp_sm90._fused_fwd_kernel
        block_n, stages = attention_jvp_sm90.SM90_TILES[head_dim]
        consts = dict(HEAD_DIM=head_dim, BLOCK_N=block_n, STAGES=stages, TANGENT=mode == "tangent")
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("Q", "K", "V", "QT", "KT", "VT", "O", "OT"):
            sig[name] = "*bf16"
        else:
            sig[name] = {"LSE": "*fp32", "scale": "fp32"}.get(name, "i32")
    constexprs = {(fn.arg_names.index(k),): v for k, v in consts.items()}
    src = GluonASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))


if __name__ == "__main__":
    head_dim, out = int(sys.argv[1]), pathlib.Path(sys.argv[2])
    kernel = build(head_dim, mode=sys.argv[3] if len(sys.argv) > 3 else "fused")
    (out / "k.ptx").write_text(kernel.asm["ptx"])
    (out / "meta.json").write_text(json.dumps({"shared": kernel.metadata.shared}))
