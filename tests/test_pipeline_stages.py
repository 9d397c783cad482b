"""The train and sample stages on a tiny config, with real Ray (local, 127.0.0.1)."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest

from conftest import ACROSS_BATCHES_UINT8_FRACTION, ACROSS_BATCHES_UINT8_LEVELS
from ddpm.checkpoint import list_checkpoints, load_checkpoint
from tasks import fetch, sample, train
from tasks.lib import cluster, sampling
from tasks.lib.samples import load_samples, shard_paths

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module (started by the first stage that needs it), shut down at the end."""
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


def _cfg(tiny_config, tmp_path, **extra):
    return tiny_config({"ray.storage": str(tmp_path / "ray"), **extra})


def test_train_two_workers_resume_and_sample_shards(tiny_config, tmp_path, ray_local):
    cfg = _cfg(tiny_config, tmp_path, **{"train.num_workers": 2, "train.steps": 6, "train.checkpoint_every": 3,
                                         "train.keep_checkpoints": 2})
    data = tmp_path / "data"
    fetch.run(cfg, data)
    ckpts, log = tmp_path / "ckpt", tmp_path / "loss.tsv"

    summary = train.run(cfg, data, ckpts, log, tmp_path / "train.json")
    assert summary["steps"] == 6
    assert [s for s, _ in list_checkpoints(ckpts)] == [3, 6]  # keep_checkpoints=2
    with open(log) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in rows)
    state = load_checkpoint(ckpts / "ckpt_00000006.pt")
    assert state["step"] == 6 and state["config"]["model"]["image_size"] == 8
    # The actors of the fit, as Ray's actor table lists them: without Ray Datasets no dataset manager, and on the Ray
    # the stage started no preemption watcher (processes with nothing to do: tasks/train.py trainer_class,
    # tasks/lib/cluster.py); the preemption switch was set for Ray's processes only, not left in this one.
    import os

    import ray

    actors = [a["ActorClassName"] for a in ray._private.state.actors().values()]
    assert actors.count("RayTrainWorker") == 2 and "TrainController" in actors, actors
    assert not {"DatasetManager", "PreemptionWatcher"} & set(actors), actors
    assert cluster.PREEMPTION_WATCHER_ENV not in os.environ

    # More steps from another ray.storage (a fresh clone after `dvc pull`: Ray Train's run is not there): the
    # checkpoint folder's newest checkpoint is newer than anything Ray Train has, and the workers resume from it
    # (through the object store), continuing the same log rather than restarting it. (A rerun on the same storage
    # resumes from Ray Train's record: tests/test_faults.py, tests/test_isolated_stages.py; a changed learning rate
    # trains from scratch: tests/test_train_unit.py.)
    cfg9 = _cfg(tiny_config, tmp_path, **{"train.num_workers": 2, "train.steps": 9, "train.checkpoint_every": 3,
                                          "train.keep_checkpoints": 2, "ray.storage": str(tmp_path / "ray-elsewhere")})
    assert train.run(cfg9, data, ckpts, log)["resumed_from_step"] == 6
    with open(log) as f:
        rows9 = list(csv.DictReader(f, delimiter="\t"))
    # continued, not retrained: the first six rows are the first run's, their measured images/s included
    assert [int(r["step"]) for r in rows9] == list(range(1, 10)) and rows9[:6] == rows
    assert [s for s, _ in list_checkpoints(ckpts)] == [6, 9]

    # 4 workers asked on 2 CPUs: capped to the 2 actors that fit, instead of waiting on the other two forever.
    # (1 vs 2 actors and another batch size: test_sample_stage_images_do_not_depend_on_the_number_of_actors.)
    out2 = tmp_path / "samples2"
    s2 = sample.run(_cfg(tiny_config, tmp_path, **{"sample.num_workers": 4}), ckpts, out2)
    assert s2["count"] == 24 and s2["shards_reused"] == 0 and s2["workers"] == 2
    assert (out2 / "grid.png").stat().st_size > 0
    a, seeds_a = load_samples(out2)
    assert a.dtype == np.uint8 and a.shape == (24, 1, 8, 8)
    assert seeds_a.tolist() == list(range(24))

    # A rerun keeps every finished shard; a deleted shard is the only one sampled again, by one actor instead of two,
    # with the same batches and threads: the same bytes (README "Reproducibility").
    (out2 / "shard_00001.npz").unlink()
    again = sample.run(_cfg(tiny_config, tmp_path, **{"sample.num_workers": 2}), ckpts, out2)
    assert again["shards_reused"] == 2 and again["workers"] == 1
    assert np.array_equal(load_samples(out2)[0], a)


def test_sample_stage_images_do_not_depend_on_the_number_of_actors(tiny_config, tiny_trained, tmp_path, ray_local):
    """README "Reproducibility": shards are planned from the seeds and sampled in batches of sample.batch_size with
    the same intra-op thread count in every actor, so 1 and 2 actors write bitwise-identical shards; another
    batch_size is another computation (oneDNN picks kernels per batch size) and agrees within round-off only."""
    ckpts = tiny_trained / "checkpoints"
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"actors{n}"
        summary = sample.run(_cfg(tiny_config, tmp_path, **{"sample.num_workers": n}), ckpts, out)
        assert summary["workers"] == n and summary["shards_reused"] == 0
        runs[n] = (out, summary)
    # uint8 rounding hides most last-bit differences (threads 1 vs 2 changed the floats by ~1e-6 but no uint8 pixel of
    # this model), so the cause of such differences is checked too: every actor of both runs sampled with one thread
    # count, as the actors report it.
    assert runs[1][1]["actor_threads"] == runs[2][1]["actor_threads"] == [sampling.CPU_THREADS_PER_ACTOR]
    names = [p.name for p in shard_paths(runs[1][0])]
    assert names == [p.name for p in shard_paths(runs[2][0])] == ["shard_00000.npz", "shard_00001.npz",
                                                                  "shard_00002.npz"]
    for name in names:
        with np.load(runs[1][0] / name) as one, np.load(runs[2][0] / name) as two:
            assert np.array_equal(one["seeds"], two["seeds"])
            assert np.array_equal(one["images"], two["images"]), name
    assert runs[1][1]["shards"] == runs[2][1]["shards"]  # the content hashes in samples.json too

    a, _ = load_samples(runs[1][0])
    assert a.std() > 20 and len({img.tobytes() for img in a}) == len(a)  # real, distinct images: not a trivial pass
    # Another batch split of the same seeds (5 + 3 in each shard of 8): round-off, not other images.
    out5 = tmp_path / "batch5"
    sample.run(_cfg(tiny_config, tmp_path, **{"sample.num_workers": 1, "sample.batch_size": 5}), ckpts, out5)
    b, seeds_b = load_samples(out5)
    assert seeds_b.tolist() == list(range(24))
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= ACROSS_BATCHES_UINT8_LEVELS, diff.max()
    assert (diff > 0).mean() <= ACROSS_BATCHES_UINT8_FRACTION, (diff > 0).mean()


def test_one_sampler_pool_samples_several_settings_as_separate_pools_would(tiny_config, tiny_trained, tmp_path,
                                                                            ray_local):
    """The sampler table's rows share one set of actors (tasks.lib.sampling.SamplerPool): each setting's shards are the
    bytes the sample stage (its own actors) writes for it, and a pool refuses settings its networks cannot serve."""
    ckpts = tiny_trained / "checkpoints"
    settings = {"ddim5": {"sample.sampler": "ddim", "sample.steps": 5, "sample.eta": 0.0},
                "ddim3": {"sample.sampler": "ddim", "sample.steps": 3, "sample.eta": 1.0},
                "ddpm": {"sample.sampler": "ddpm"}}
    cfgs = {k: _cfg(tiny_config, tmp_path, **{**v, "sample.num_workers": 2, "sample.num_samples": 12,
                                              "sample.shard_size": 4}) for k, v in settings.items()}
    ckpt = sampling.newest_checkpoint(ckpts)
    shared: dict[str, dict[str, str]] = {}
    with sampling.SamplerPool(cfgs["ddim5"], ckpt, jobs=3) as pool:
        assert pool.workers == 2 and pool.actors_startup_s > 0
        for k, cfg in cfgs.items():
            s = cfg.sample
            todo = list(enumerate(sampling.plan_shards(s.num_samples, s.shard_size, s.seed)))
            (tmp_path / f"pool_{k}").mkdir()
            jobs = pool.write_shards(s, tmp_path / f"pool_{k}", todo, sampling.sampling_key(s, ckpt))
            shared[k] = {name: sha for name, sha, _, _ in jobs}
        with pytest.raises(ValueError, match="sample.use_ema"):
            pool.write_shards(_cfg(tiny_config, tmp_path, **{"sample.use_ema": False}).sample, tmp_path / "x", todo,
                              "key")
    assert pool.actors == []  # killed when the block ends
    images = {}
    for k, cfg in cfgs.items():
        alone = sample.run(cfg, ckpts, tmp_path / f"alone_{k}")
        assert alone["workers"] == 2  # its own actors
        assert shared[k] == alone["shards"], k  # content hashes of every shard
        images[k] = load_samples(tmp_path / f"pool_{k}")[0]
        assert np.array_equal(images[k], load_samples(tmp_path / f"alone_{k}")[0]), k
    # three settings, three different sets of images (the actors did switch settings)
    assert len({a.tobytes() for a in images.values()}) == 3


def test_train_cli_bad_input_is_one_line(tmp_path, repo_root):
    params = tmp_path / "p.yaml"
    params.write_text("train:\n  lr: -1\n")
    r = subprocess.run([sys.executable, "-m", "tasks.train", "--params", str(params), "--data", str(tmp_path / "d"),
                        "--checkpoints", str(tmp_path / "c")], cwd=repo_root, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: train.lr: input should be greater than 0, got -1"
    assert not (tmp_path / "c").exists()


def test_sampler_table_rows_are_what_the_sample_and_evaluate_stages_measure(tiny_config, tiny_trained, tmp_path,
                                                                            ray_local):
    """The sampler table samples with the sample stage's actors and scores with the evaluate stage's machinery: a
    row's FID and KID, and the floor, are exactly what those stages measure for the row's settings."""
    from tasks import evaluate, sampler_table, train_classifier

    cfg = _cfg(tiny_config, tmp_path, **{
        "sample.num_workers": 2, "sampler_table.enabled": True, "sampler_table.num_samples": 20,
        "sampler_table.ddim_steps": [5], "sampler_table.solvers": ["dpm++2m"], "sampler_table.solver_steps": [4],
        "sampler_table.batch_size": 10, "sampler_table.bootstrap": 10})
    data, ckpts = tiny_trained / "dataset", tiny_trained / "checkpoints"
    clf = tmp_path / "classifier.pt"
    train_classifier.run(cfg, data, clf, tmp_path / "classifier.json")
    table = sampler_table.run(cfg, ckpts, data, clf, tmp_path / "ref", tmp_path / "t.json", tmp_path / "t.md")
    assert [(r["sampler"], r["steps"]) for r in table["rows"]] == [("ddpm", 100), ("ddim", 5), ("dpm++2m", 4)]
    assert all(r["fid"] > 0 and r["fid_std"] > 0 for r in table["rows"]) and table["answer"]["reference"] == "ddpm100"
    for spec, row in zip(sampler_table.settings(cfg), table["rows"]):
        settings = sampler_table.row_config(cfg, spec)
        out = tmp_path / sampler_table.row_name(spec)
        assert sample.run(settings, ckpts, out)["seeds"] == table["seeds"] == [0, 19]
        ev = evaluate.run(settings, data, out, clf, tmp_path / "ref", tmp_path / f"{out.name}.json")
        assert (ev["fid"], ev["kid_mean"]) == (row["fid"], row["kid_mean"]), spec
    assert ev["floor"]["fid"] == table["floor"]["fid"] and table["floor"]["num_holdout"] == 20
