"""net_copier's meta_clone: a structural copy with no weight memory, for loading shards rank by rank."""

import torch

from rcm_core.parallel.parallelize import meta_clone
from tests.teachers.wan_tiny import build_wan_tiny


def test_meta_clone_copies_structure_not_weights():
    from rcm_core.teachers.wan import WanNet

    net = WanNet.from_diffusers(build_wan_tiny())
    net.blocks[0].attn1.norm_q.weight.requires_grad_(False)
    clone = meta_clone(net)
    src = dict(net.named_parameters())
    cloned = dict(clone.named_parameters())
    assert cloned.keys() == src.keys() and len(cloned) > 10
    for name, p in cloned.items():
        assert p.is_meta and p.dtype == src[name].dtype and p.shape == src[name].shape, name
        assert p.requires_grad == src[name].requires_grad, name
    assert not any(p.is_meta for p in net.parameters())  # the source keeps its weights
    assert type(clone.blocks[0]) is type(net.blocks[0]) and clone.blocks[0].attn1.core_attention is not None
    assert all(b.is_meta for b in clone.buffers())
    x = torch.zeros(1)
    assert clone.shard_sequence(x, 0) is x  # hooks stored as attributes come along
