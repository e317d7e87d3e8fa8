"""The moving-shapes text conditioning (frozen word + position embeddings) and its rcm-latents-v1 dataset writer."""

import json

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from rcm_core.cli import main
from rcm_core.config import ConfigError
from rcm_core.data import moving_shapes as ms
from rcm_core.data.latent_shards import iter_shard, read_manifest
from rcm_core.data.moving_shapes_dataset import render_chunk, write_dataset
from rcm_core.data.moving_shapes_text import FrozenTextEncoder


def test_frozen_text_encoder_is_deterministic_ordered_and_pads_with_zeros():
    enc = FrozenTextEncoder(tokens=16, dim=64, seed=0)
    a = "a video of a red circle and a green square moving left slowly"
    b = "a video of a green circle and a red square moving left slowly"  # same words, other binding
    tokens, lengths = enc.encode([a, b, ""])
    assert tokens.shape == (3, 16, 64) and tokens.dtype == np.float32
    assert lengths.tolist() == [13, 13, 0]
    # cross-attention sees the tokens as a set: without positions both captions are the same set of rows (the
    # binding of colour to shape would be lost); the positions keep it
    assert not np.allclose(np.sort(tokens[0], axis=0), np.sort(tokens[1], axis=0))
    assert np.all(tokens[0, 13:] == 0) and np.all(tokens[2] == 0)  # padding rows and the null prompt are zero
    again, _ = FrozenTextEncoder(tokens=16, dim=64, seed=0).encode([a])
    assert np.array_equal(again[0], tokens[0])
    other, _ = FrozenTextEncoder(tokens=16, dim=64, seed=1).encode([a])
    assert not np.allclose(other[0], tokens[0])
    cond = enc.cond([a, ""])
    assert cond["tokens"].shape == (2, 16, 64) and cond["mask"].dtype == torch.bool
    assert cond["mask"].sum(1).tolist() == [13, 0]
    null = enc.null_cond(2)
    assert not null["mask"].any() and not null["tokens"].any()
    with pytest.raises(ValueError, match="'dancing' is not a word of the grammar"):
        enc.encode(["a video of a circle dancing"])
    with pytest.raises(ValueError, match="tokens must be >= 13"):
        FrozenTextEncoder(tokens=8)


def test_encoder_spec_round_trips_and_refuses_another_table():
    enc = FrozenTextEncoder(tokens=16, dim=32, seed=3)
    spec = json.loads(json.dumps(enc.spec()))
    back = FrozenTextEncoder.from_spec(spec)
    assert back.sha256() == enc.sha256() and np.array_equal(back.table, enc.table)
    with pytest.raises(ValueError, match="sha256 differs"):
        FrozenTextEncoder.from_spec({**spec, "seed": 4})
    with pytest.raises(ValueError, match="name must be"):
        FrozenTextEncoder.from_spec({**spec, "name": "t5"})


def test_writer_stores_the_rendered_clips_and_encoded_captions(tmp_path):
    out = tmp_path / "ds"
    summary = write_dataset(str(out), count=300, split="held_out", seed=7, samples_per_shard=128, text_dim=32)
    assert summary["count"] == 300 and summary["shards"] == 3
    fs = pafs.LocalFileSystem()
    manifest = read_manifest(fs, str(out))
    assert manifest.latent == {"shape": [3, ms.FRAMES, 32, 32], "dtype": "float16"}
    assert manifest.text["tokens"] == 16 and manifest.text["dim"] == 32
    assert manifest.extra["renderer"] == ms.RENDERER_VERSION and manifest.extra["split"] == "held_out"
    enc = FrozenTextEncoder.from_spec(manifest.encoder)  # the manifest identifies the encoder exactly
    rows = [r for s in manifest.shards for r in iter_shard(fs, str(out), manifest, s["name"])]
    assert len({r["key"] for r in rows}) == 300
    clips, captions = render_chunk((7, "held_out", 0, 300))  # chunk 0 = the first 1024 clips' generator
    assert [r["caption"] for r in rows] == captions
    assert all(ms.parse_caption(c).is_held_out() for c in captions)
    latents = torch.stack([r["latent"] for r in rows])  # (N, 3, F, H, W) float32 from float16
    assert latents.min() >= -1 and latents.max() <= 1
    assert np.array_equal(ms.to_uint8_clips(latents), clips)  # float16 storage is exact after rounding to uint8
    tokens, lengths = enc.encode(captions[:5])
    for row, tok, n in zip(rows[:5], tokens, lengths, strict=True):
        assert torch.equal(row["tokens"], torch.from_numpy(tok)) and int(row["mask"].sum()) == n
    with pytest.raises(ConfigError, match="already holds a dataset"):
        write_dataset(str(out), count=10)


def test_writer_output_does_not_depend_on_the_number_of_workers(tmp_path):
    fs = pafs.LocalFileSystem()
    latents = []
    for workers in (0, 2):
        root = str(tmp_path / f"w{workers}")
        write_dataset(root, count=1100, seed=1, workers=workers)  # two chunks (1024 + 76)
        manifest = read_manifest(fs, root)
        latents.append(
            torch.stack([r["latent"] for s in manifest.shards for r in iter_shard(fs, root, manifest, s["name"])])
        )
    assert torch.equal(latents[0], latents[1])


def test_cli_data_moving_shapes_writes_and_rejects_bad_input(tmp_path, capsys):
    assert main(["data", "moving-shapes", "--out", str(tmp_path / "a"), "--count", "20", "--text-dim", "16"]) == 0
    assert "20 train clips in 1 shard(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["data", "moving-shapes", "--out", str(tmp_path / "b"), "--count", "20", "--split", "test"])
    assert exc.value.code == 2
    assert main(["data", "moving-shapes", "--out", str(tmp_path / "c"), "--count", "5", "--text-dim", "7"]) == 2
    err = capsys.readouterr().err
    assert "dim must be an even integer" in err and "Traceback" not in err
