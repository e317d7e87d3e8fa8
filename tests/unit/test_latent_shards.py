"""rcm-latents-v1 shards (rcm_core.data.latent_shards): write, manifest last, read back exactly."""

import pyarrow.fs as pafs
import pytest
import torch

from rcm_core.data.latent_shards import ShardFormatError, ShardWriter, iter_shard, read_manifest


def test_round_trip_keeps_values_shapes_and_masks(tmp_path):
    fs, root = pafs.LocalFileSystem(), str(tmp_path / "ds")
    gen = torch.Generator().manual_seed(0)
    samples = [(torch.randn(6, 4, generator=gen), i % 6 + 1, torch.randn(2, 3, 2, 2, generator=gen)) for i in range(7)]
    with ShardWriter(fs, root, text_tokens=6, text_dim=4, latent_shape=(2, 3, 2, 2), samples_per_shard=3) as w:
        for i, (tok, n, lat) in enumerate(samples):
            w.add(f"s{i}", f"caption {i}", tok, n, lat)
    m = read_manifest(fs, root)
    assert m.count == 7 and [s["count"] for s in m.shards] == [3, 3, 1]
    got = [row for s in m.shards for row in iter_shard(fs, root, m, s["name"])]
    assert [r["key"] for r in got] == [f"s{i}" for i in range(7)]
    for r, (tok, n, lat) in zip(got, samples, strict=True):
        assert torch.equal(r["tokens"], tok.to(torch.bfloat16).float())  # text stored bf16 by default
        assert torch.equal(r["latent"], lat)  # latents float32
        assert r["mask"].sum() == n and r["mask"][:n].all()


def test_manifest_is_written_last_and_bad_samples_are_refused(tmp_path):
    fs, root = pafs.LocalFileSystem(), str(tmp_path / "ds")
    w = ShardWriter(fs, root, text_tokens=2, text_dim=2, latent_shape=None, samples_per_shard=1)
    w.add("a", "x", torch.zeros(2, 2), 1, None)
    with pytest.raises(ShardFormatError, match="no manifest.json"):
        read_manifest(fs, root)  # a shard exists, the dataset is not complete yet
    with pytest.raises(ShardFormatError, match="duplicate sample key 'a'"):
        w.add("a", "y", torch.zeros(2, 2), 1, None)
    with pytest.raises(ShardFormatError, match=r"tokens of 'b' have shape \(3, 2\)"):
        w.add("b", "y", torch.zeros(3, 2), 1, None)
    with pytest.raises(ShardFormatError, match="latent given for a prompts-only dataset"):
        w.add("c", "y", torch.zeros(2, 2), 1, torch.zeros(1))
    assert w.close().count == 1 and read_manifest(fs, root).latent is None
