"""The streaming reader (rcm_core.data.latent_stream): disjoint shares per data-parallel rank, the same samples for
the context-parallel ranks of a group, a real shuffle, and resume from a recorded position without repeats."""

import pyarrow.fs as pafs
import pytest
import torch

from rcm_core.data.latent_shards import ShardFormatError, ShardWriter, read_manifest
from rcm_core.data.latent_stream import LatentStream, collate, epoch_order, list_row_groups

N = 37  # samples: 5 shards of 8 (the last 5), row groups of 3 -> uneven groups and shards


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    fs, root = pafs.LocalFileSystem(), str(tmp_path_factory.mktemp("stream") / "ds")
    with ShardWriter(
        fs, root, text_tokens=4, text_dim=2, latent_shape=(1, 1, 2, 2), samples_per_shard=8, row_group_size=3
    ) as w:
        for i in range(N):  # the sample's index is written into its tensors: a read-back checks the pairing
            w.add(f"s{i:03d}", f"caption {i}", torch.full((4, 2), float(i)), i % 4 + 1, torch.full((1, 1, 2, 2), i))
    return fs, root


def _keys(samples):
    return [s["key"] for s in samples]


def test_ranks_read_disjoint_shares_covering_the_epoch(dataset):
    fs, root = dataset
    shares = []
    for rank in range(3):
        stream = LatentStream(fs, root, dp_rank=rank, dp_size=3, seed=7, buffer_size=5)
        shares.append(_keys(stream.take(stream.epoch_size())))
        stream.close()
    seen = [k for share in shares for k in share]
    assert sorted(seen) == [f"s{i:03d}" for i in range(N)]  # every sample once, over all ranks together
    assert all(len(s) >= 9 for s in shares)  # 14 row groups dealt 5/5/4: no rank starves


def test_context_parallel_ranks_of_a_group_read_the_same_samples(dataset):
    fs, root = dataset
    a = LatentStream(fs, root, dp_rank=1, dp_size=2, seed=3, buffer_size=4)
    b = LatentStream(fs, root, dp_rank=1, dp_size=2, seed=3, buffer_size=4)
    assert _keys(a.take(30)) == _keys(b.take(30))  # across the epoch boundary too


def test_samples_keep_their_tensors_and_the_order_is_shuffled(dataset):
    fs, root = dataset
    stream = LatentStream(fs, root, seed=1, buffer_size=8)
    samples = stream.take(N)
    for s in samples:
        i = int(s["key"][1:])
        assert torch.equal(s["tokens"].float(), torch.full((4, 2), float(i)))
        assert torch.equal(s["latent"], torch.full((1, 1, 2, 2), float(i)))
        assert int(s["mask"].sum()) == i % 4 + 1
    order = [int(k[1:]) for k in _keys(samples)]
    assert sorted(order) == list(range(N)) and order != sorted(order)
    again = LatentStream(fs, root, seed=1, buffer_size=8)
    assert _keys(again.take(N)) == _keys(samples)  # deterministic for a seed
    next_epoch = _keys(stream.take(N))
    assert sorted(next_epoch) == sorted(_keys(samples)) and next_epoch != _keys(samples)  # reshuffled per epoch
    x0, cond = collate(samples[:3])
    assert x0.shape == (3, 1, 1, 2, 2) and cond["tokens"].shape == (3, 4, 2) and cond["mask"].shape == (3, 4)
    assert (cond["tokens"][~cond["mask"]] == 0).all()  # padding zeroed


@pytest.mark.parametrize("stop", [0, 1, 6, 11, 18])
def test_resume_from_recorded_position_yields_exactly_the_rest_of_the_epoch(dataset, stop):
    fs, root = dataset
    full = LatentStream(fs, root, dp_rank=0, dp_size=2, seed=11, buffer_size=6)
    whole = _keys(full.take(full.epoch_size()))
    first = LatentStream(fs, root, dp_rank=0, dp_size=2, seed=11, buffer_size=6)
    seen = _keys(first.take(stop))
    position = first.position
    first.close()  # the worker dies; a new one is built and seeks to the position its checkpoint recorded
    resumed = LatentStream(fs, root, dp_rank=0, dp_size=2, seed=11, buffer_size=6)
    resumed.seek(*position)
    rest = _keys(resumed.take(resumed.epoch_size() - stop))
    assert seen + rest == whole
    assert len(set(seen + rest)) == len(whole)  # no sample of the epoch twice
    assert resumed.position == (0, len(whole))
    assert resumed.take(1) and resumed.position == (1, 1)  # then the next epoch


def test_epoch_order_is_a_permutation_for_any_buffer(dataset):
    fs, root = dataset
    groups = list_row_groups(fs, root, read_manifest(fs, root))
    for buffer_size in (1, 2, 50):
        order = epoch_order(groups, seed=0, epoch=0, dp_rank=0, dp_size=1, buffer_size=buffer_size)
        assert sorted(order) == sorted((g, r) for g, grp in enumerate(groups) for r in range(grp.rows))


def test_more_ranks_than_row_groups_is_refused(dataset):
    fs, root = dataset
    with pytest.raises(ShardFormatError, match="14 row groups, fewer than the 15 data-parallel ranks"):
        LatentStream(fs, root, dp_rank=0, dp_size=15)
