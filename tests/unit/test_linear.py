"""rcm_core.models.linear: nn.Linear values, gradients and tangents, with one GEMM per linear in the JVP."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rcm_core.models.dit import DiT, dit_debug
from rcm_core.models.linear import Linear

MATMULS = ("aten.mm", "aten.addmm")


def _pair(seed: int = 0) -> tuple[nn.Linear, Linear]:
    torch.manual_seed(seed)
    ref = nn.Linear(48, 80)
    mine = Linear(48, 80)
    mine.load_state_dict(ref.state_dict())
    return ref, mine


def _matmul_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return sum(n for op, n in counter.get_flop_counts()["Global"].items() if str(op) in MATMULS)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
def test_linear_matches_nn_linear_bitwise(autocast):
    ref, mine = _pair()
    x, x_t, grad = torch.randn(3, 7, 48), torch.randn(3, 7, 48), torch.randn(3, 7, 80)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with torch.no_grad():
            (y_ref, t_ref), (y, t) = torch.func.jvp(ref, (x,), (x_t,)), torch.func.jvp(mine, (x,), (x_t,))
        leaves = [x.clone().requires_grad_() for _ in range(2)]
        ref(leaves[0]).backward(grad.to(y_ref.dtype))
        mine(leaves[1]).backward(grad.to(y.dtype))
    assert y.dtype == y_ref.dtype and t.dtype == t_ref.dtype
    assert torch.equal(y, y_ref) and torch.equal(t, t_ref)
    assert torch.equal(leaves[1].grad, leaves[0].grad)
    assert torch.equal(mine.weight.grad, ref.weight.grad) and torch.equal(mine.bias.grad, ref.bias.grad)


def test_linear_tangent_in_parameters():
    """A jvp in parameter space (weight and bias tangents) still adds x W_t^T + b_t."""
    ref, mine = _pair()
    x = torch.randn(5, 48)
    params = dict(mine.named_parameters())
    tangents = {k: torch.randn_like(v) for k, v in params.items()}

    def run(module):
        return torch.func.jvp(lambda p: torch.func.functional_call(module, p, (x,)), (params,), (tangents,))[1]

    torch.testing.assert_close(run(mine), run(ref), rtol=1e-6, atol=1e-6)


def test_jvp_runs_one_matmul_per_linear():
    """nn.Linear's jvp also multiplies x by a zero weight tangent (3 GEMMs per linear); ours runs 2."""
    ref, mine = _pair()
    x, x_t = torch.randn(4, 48), torch.randn(4, 48)
    forward = _matmul_flops(lambda: mine(x))
    assert _matmul_flops(lambda: torch.func.jvp(ref, (x,), (x_t,))) == 3 * forward  # what PyTorch does
    assert _matmul_flops(lambda: torch.func.jvp(mine, (x,), (x_t,))) == 2 * forward


def test_dit_jvp_counts_two_linear_passes():
    """The DiT's JVP in (x, t) (sCM's) costs twice its forward's linear FLOPs (attention bmm's not counted), less
    the cross-attention key/value projections of the condition tokens, which carry no tangent."""
    torch.manual_seed(0)
    cfg = dit_debug()
    net = DiT(cfg)
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    cond = {"tokens": torch.randn(2, 5, 32), "mask": torch.ones(2, 5, dtype=torch.bool)}
    with torch.no_grad():
        forward = _matmul_flops(lambda: net(x, t, cond))
        jvp = _matmul_flops(lambda: torch.func.jvp(lambda a, b: net(a, b, cond), (x, t), (x, torch.ones_like(t))))
    context_kv = cfg.depth * 2 * 2 * 5 * cfg.cond_dim * 2 * cfg.dim  # per block: 2 B Lc Dc (2 D)
    assert jvp == 2 * forward - context_kv
