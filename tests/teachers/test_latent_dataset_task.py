"""The diffusers task trained from an rcm-latents-v1 dataset (data.dataset "latents", rcm_core.tasks.diffusers
DatasetData) in one process on the tiny Wan: batches are the dataset's samples, the reader's position rides in
the checkpoint, and a run stopped mid-epoch and resumed draws exactly the samples the uninterrupted run draws
(none twice in the epoch). Mismatches between the dataset and the teacher are ConfigErrors naming data.uri.
Against the real stack (SeaweedFS, Ray, 2 workers): tests/service/test_e2e_stack.py."""

import pyarrow.fs as pafs
import pytest
import torch

from rcm_core import pipeline
from rcm_core.checkpoint import DirectoryStore
from rcm_core.config import ConfigError, config_from_dict
from rcm_core.data.latent_shards import ShardWriter
from rcm_core.tasks import get_task
from rcm_core.trainer import Trainer

LATENT = (4, 2, 4, 4)  # the tiny Wan: in_channels 4, patch (1, 2, 2)
N = 10


def write_dataset(root, *, text_dim=24, latents=True, channels=4, count=N):
    gen = torch.Generator().manual_seed(0)
    shape = (channels, *LATENT[1:])
    with ShardWriter(
        pafs.LocalFileSystem(),
        str(root),
        text_tokens=6,
        text_dim=text_dim,
        latent_shape=shape if latents else None,
        samples_per_shard=5,
        row_group_size=2,
    ) as w:
        for i in range(count):
            latent = torch.randn(shape, generator=gen) if latents else None
            w.add(f"k{i:02d}", f"caption {i}", torch.randn(6, text_dim, generator=gen), 2 + i % 4, latent)
    return str(root)


def _cfg(teacher, out, uri, steps, **loss):
    spec = {
        "teacher": {"path": str(teacher)},
        "data": {"dataset": "latents", "uri": uri, "shuffle_buffer": 4},
        "loss": {"critic_ratio": 1, **loss},
        "train": {"steps": steps, "batch_size": 2, "log_every": 1, "checkpoint_every": 2, "output_dir": str(out)},
        "eval": {"num_samples": 10, "teacher_steps": [2]},
    }
    return config_from_dict(spec, base=get_task("diffusers").preset("wan2.1"))


def _recording(distiller):
    """The keys of every sample the Distiller draws, in order."""
    seen, stream = [], distiller.task.stream
    take = stream.take

    def recorded(n):
        out = take(n)
        seen.extend(s["key"] for s in out)
        return out

    stream.take = recorded
    return seen


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from tests.teachers.wan_tiny import save_wan_tiny

    return save_wan_tiny(tmp_path_factory.mktemp("wan") / "transformer")


def _run(cfg, store):
    net, meta, _ = pipeline.get_teacher(cfg)
    distiller = pipeline.build_distiller(cfg, net, meta)
    seen = _recording(distiller)
    trainer = Trainer(distiller, store)
    trainer.resume()
    trainer.run()
    return distiller, seen


def test_training_draws_dataset_samples_and_resumes_without_repeats(tmp_path, teacher):
    uri = write_dataset(tmp_path / "ds")
    # critic step + student step: 4 samples a step; 3 steps = 12 > 10 samples, so the run crosses into epoch 1
    whole, seen_whole = _run(_cfg(teacher, tmp_path / "a", uri, 3), DirectoryStore(tmp_path / "a"))
    assert len(seen_whole) == 12 and sorted(seen_whole[:N]) == [f"k{i:02d}" for i in range(N)]
    assert whole.task.stream.position == (1, 2)
    # the same run stopped after step 2 (its checkpoint), then a new process resumes from it
    first, seen_first = _run(_cfg(teacher, tmp_path / "b", uri, 2), DirectoryStore(tmp_path / "b"))
    assert first.task.stream.position == (0, 8)
    resumed, seen_rest = _run(_cfg(teacher, tmp_path / "b", uri, 3), DirectoryStore(tmp_path / "b"))
    assert resumed.step == 3 and resumed.task.stream.position == (1, 2)
    assert seen_first + seen_rest == seen_whole  # exactly the remaining samples, none of the epoch twice


def test_batches_are_the_datasets_latents_and_tokens(tmp_path, teacher):
    uri = write_dataset(tmp_path / "ds")
    cfg = _cfg(teacher, tmp_path / "run", uri, 1)
    net, meta, _ = pipeline.get_teacher(cfg)
    data = get_task("diffusers").build_data(cfg, meta, None)
    x0, cond = data.sample(2, generator=torch.Generator())
    assert x0.shape == (2, *LATENT) and cond["tokens"].shape == (2, 6, 24) and x0.dtype == torch.float32
    from rcm_core.data.latent_shards import iter_shard, read_manifest

    fs, m = pafs.LocalFileSystem(), read_manifest(pafs.LocalFileSystem(), uri)
    stored = {r["key"]: r for s in m.shards for r in iter_shard(fs, uri, m, s["name"])}
    for row in range(2):  # each drawn row is one stored sample: its latent, its (padding-zeroed) tokens and mask
        match = [r for r in stored.values() if torch.equal(r["latent"], x0[row])]
        assert len(match) == 1
        assert torch.equal(cond["tokens"][row], match[0]["tokens"] * match[0]["mask"][:, None])
        assert torch.equal(cond["mask"][row], match[0]["mask"])


@pytest.mark.parametrize(
    ("kwargs", "loss", "expected"),
    [
        ({"text_dim": 16}, {}, "text.dim 16 in its manifest, the teacher takes 24"),
        ({"channels": 3}, {}, "latents of 3 channels, the teacher takes 4"),
        ({"latents": False}, {}, "a prompts-only dataset .* trains DMD only"),
    ],
)
def test_dataset_the_teacher_cannot_use_is_a_config_error(tmp_path, teacher, kwargs, loss, expected):
    uri = write_dataset(tmp_path / "ds", **kwargs)
    cfg = _cfg(teacher, tmp_path / "run", uri, 1, **loss)
    net, meta, _ = pipeline.get_teacher(cfg)
    with pytest.raises(ConfigError, match=f"data.uri {uri}: {expected}"):
        get_task("diffusers").build_data(cfg, meta, None)


def test_prompts_only_dataset_trains_dmd_only(tmp_path, teacher):
    uri = write_dataset(tmp_path / "ds", latents=False)
    spec_cfg = _cfg(teacher, tmp_path / "run", uri, 2, scm_weight=0.0)
    import dataclasses

    cfg = dataclasses.replace(spec_cfg, data=dataclasses.replace(spec_cfg.data, latent_shape=list(LATENT)))
    distiller, seen = _run(cfg, DirectoryStore(tmp_path / "run"))
    assert distiller.step == 2 and len(seen) == 8 and len(set(seen)) == 8
