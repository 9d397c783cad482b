"""The sharded dataset artifact (tasks/lib/shards.py): what fetch writes, what training streams, how the old layout
is refused, and the accumulated reference statistics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks import fetch
from tasks.lib import refstats, shards
from tasks.lib.errors import DataError
from tasks.lib.shards import Split
from tasks.lib.files import write_json, write_npz
from tasks.lib.shards import TrainStream, open_dataset, write_dataset

REPO = Path(__file__).resolve().parents[1]
NO_ATTN = {"model.attn_resolutions": []}


def numbered(n: int, start: int = 0) -> Split:
    """n images [1, 4, 4] whose first two pixels spell their number (so a batch says which rows it holds)."""
    ids = np.arange(start, start + n)
    images = np.zeros((n, 1, 4, 4), dtype=np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = ids // 256, ids % 256
    return Split(images, ids.astype(np.int64) % 10)


def ids_of(batch: np.ndarray) -> np.ndarray:
    return batch[:, 0, 0, 0].astype(np.int64) * 256 + batch[:, 0, 0, 1]


@pytest.fixture
def sharded(tmp_path) -> Path:
    """1,000 numbered training images in 10 shards of 100 (one row group each), 50 held out."""
    write_dataset(tmp_path / "ds", numbered(1000), numbered(50, 5000), {"dataset": "test", "num_classes": 10},
                  shard_images=100)
    return tmp_path / "ds"


def test_manifest_counts_shards_and_reads_back(sharded):
    meta = json.loads((sharded / "dataset.json").read_text())
    assert meta["format"] == shards.FORMAT and meta["count"] == {"train": 1000, "holdout": 50}
    assert [s["rows"] for s in meta["splits"]["train"]["shards"]] == [100] * 10
    assert sorted(p.name for p in (sharded / "train").iterdir()) == [f"part-{i:05d}.parquet" for i in range(10)]
    ds = open_dataset(sharded)
    assert len(ds.train) == 1000 and len(ds.holdout) == 50 and ds.shape == (1, 4, 4)
    np.testing.assert_array_equal(ids_of(ds.train.read_all().images), np.arange(1000))
    picked = ds.train.take([999, 3, 450])
    np.testing.assert_array_equal(ids_of(picked.images), [999, 3, 450])
    np.testing.assert_array_equal(picked.labels, [9, 3, 0])
    assert ids_of(ds.train[731][None])[0] == 731 and ids_of(ds.holdout.head(2).images).tolist() == [5000, 5001]


def test_a_changed_shard_is_named(sharded):
    victim = sharded / "train" / "part-00003.parquet"
    victim.write_bytes(victim.read_bytes()[:200])
    ds = open_dataset(sharded)  # only the manifest is read here
    with pytest.raises(DataError, match=r"part-00003.parquet: unreadable dataset shard .*re-fetch it"):
        ds.train.take([350])
    np.testing.assert_array_equal(ids_of(ds.train.take([250]).images), [250])  # the other shards still read


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_worker_reads_a_disjoint_part_of_each_epoch(sharded, world):
    ds = open_dataset(sharded)
    streams = [TrainStream(ds.train, 16, r, world, seed=0, buffer_rows=250) for r in range(world)]
    steps = (1000 // world) // 16
    orders = []
    for epoch in (0, 1):
        parts = [np.concatenate([ids_of(b) for b in s.epoch(epoch)]) for s in streams]
        assert [len(p) for p in parts] == [steps * 16] * world  # the same number of steps on every rank
        seen = np.concatenate(parts)
        assert len(np.unique(seen)) == len(seen)  # disjoint
        assert seen.min() >= 0 and seen.max() < 1000
        orders.append(parts[0])
    assert not np.array_equal(orders[0], orders[1])  # a new order each epoch
    # Shuffled within windows, not read in file order.
    assert not np.array_equal(np.sort(orders[0]), orders[0])


def test_resume_yields_what_the_uninterrupted_epoch_would_have(sharded):
    ds = open_dataset(sharded)
    for buffer_rows in (120, 10_000):  # windows that straddle shards; one window holding the whole part
        s = TrainStream(ds.train, 16, 1, 2, seed=7, buffer_rows=buffer_rows)
        full = [ids_of(b) for b in s.epoch(3)]
        for skip in (1, 7, len(full) - 1):
            rest = [ids_of(b) for b in TrainStream(ds.train, 16, 1, 2, seed=7, buffer_rows=buffer_rows).epoch(3, skip)]
            assert len(rest) == len(full) - skip
            for a, b in zip(full[skip:], rest):
                np.testing.assert_array_equal(a, b)


def test_windows_bound_what_a_worker_holds(sharded):
    ds = open_dataset(sharded)
    s = TrainStream(ds.train, 16, 0, 1, seed=0, buffer_rows=250)
    sizes = [sum(b - a for _, a, b in w) for w in s._windows(0)]
    assert sum(sizes) == 1000 and max(sizes) < 250 + 100  # a window closes at the first group past the buffer


def test_the_old_single_file_layout_is_refused_with_how_to_refetch(tiny_config, tmp_path):
    old = tmp_path / "data" / "dataset"
    old.mkdir(parents=True)
    write_npz(old / "train.npz", images=np.zeros((4, 1, 8, 8), np.uint8), labels=np.zeros(4, np.int64))
    write_npz(old / "holdout.npz", images=np.zeros((2, 1, 8, 8), np.uint8), labels=np.zeros(2, np.int64))
    write_json(old / "dataset.json", {"dataset": "digits", "shape": [1, 8, 8], "sha256": "0" * 64})
    with pytest.raises(DataError, match=r"old single-file layout \(train.npz\).*re-fetch it: `dvc repro fetch`"):
        open_dataset(old)
    # Through a stage's command line: one line, exit 2, no traceback.
    r = subprocess.run([sys.executable, "-m", "tasks.train", "--params", str(REPO / "params.yaml"), "--data", str(old),
                        "--checkpoints", str(tmp_path / "ck"), "--log", str(tmp_path / "l.tsv"),
                        "--metrics", str(tmp_path / "m.json")], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "old single-file layout" in lines[0] and f"--out {old}" in lines[0]
    assert not (tmp_path / "ck").exists()
    # Re-fetching into the folder replaces the old files.
    cfg = tiny_config(NO_ATTN)
    fetch.run(cfg, old)
    assert not (old / "train.npz").exists() and not (old / "holdout.npz").exists()
    assert len(open_dataset(old).train) == 1437


def _image_folder(root: Path, n_per_class: int = 4) -> None:
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_bad_images_skip_leaves_them_out_and_counts_them(tiny_config, tmp_path, capsys):
    root = tmp_path / "imgs"
    _image_folder(root)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    cfg = tiny_config({**NO_ATTN, "data.dataset": "image-folder", "data.root": str(root), "data.image_size": 8,
                       "data.holdout_fraction": 0.25, "data.bad_images": "skip", "data.ingest_workers": 1})
    meta = fetch.run(cfg, tmp_path / "ds")
    assert meta["skipped"] == {"count": 1, "files": ["dog/broken.png"]}
    assert meta["count"]["train"] + meta["count"]["holdout"] == 8
    assert "skipped 1 unreadable image file(s)" in capsys.readouterr().err
    # The default refuses, naming the file, and leaves the previous output as it was.
    before = (tmp_path / "ds" / "dataset.json").read_bytes()
    with pytest.raises(DataError, match=r"1 unreadable image file\(s\) under .*: dog/broken.png"):
        fetch.run(tiny_config({**NO_ATTN, "data.dataset": "image-folder", "data.root": str(root),
                               "data.image_size": 8, "data.holdout_fraction": 0.25}), tmp_path / "ds")
    assert (tmp_path / "ds" / "dataset.json").read_bytes() == before
    assert not list(tmp_path.glob(".ds.staging-*"))


def test_parallel_ingest_writes_the_same_dataset(tiny_config, tmp_path):
    root = tmp_path / "imgs"
    _image_folder(root, n_per_class=300)  # 600 images: more than two decode chunks
    metas = []
    for workers in (1, 2):
        cfg = tiny_config({**NO_ATTN, "data.dataset": "image-folder", "data.root": str(root), "data.image_size": 8,
                           "data.ingest_workers": workers, "data.shard_images": 128})
        metas.append(fetch.run(cfg, tmp_path / f"ds{workers}"))
    assert metas[0]["sha256"] == metas[1]["sha256"] and metas[0]["splits"] == metas[1]["splits"]
    assert len(metas[0]["splits"]["train"]["shards"]) == 4  # 480 train images in shards of 128
    assert metas[0]["num_classes"] == 2 and metas[0]["classes"] == ["cat", "dog"]


def test_one_set_of_decode_processes_serves_both_splits_and_none_starts_for_one_chunk(tiny_config, tmp_path):
    """Two workers asked: a folder whose training split spans two chunks is decoded by two processes, started once
    for both splits; a folder of one chunk per split starts none. (That their pixels are a single-process decode's:
    test_parallel_ingest_writes_the_same_dataset, through the fetch stage.)"""
    import psutil

    from tasks.lib.datasets import INGEST_CHUNK, Decoder, plan_image_folder

    me = psutil.Process()

    def pool_processes() -> set[int]:
        """The decode processes under this one: forked by multiprocessing's forkserver, so their command line is
        its own (not the forkserver itself, nor a server or Ray that another test left to this xdist worker)."""
        found = set()
        for p in me.children(recursive=True):
            try:
                if "forkserver" in " ".join(p.cmdline()) and "forkserver" in " ".join(p.parent().cmdline()):
                    found.add(p.pid)
            except (psutil.Error, AttributeError):  # gone, or a parent already gone
                pass
        return found

    def decoded(n_per_class: int):
        """{split: images} and {split: the decode processes started by then} for a fresh folder (multiprocessing's
        forkserver outlives a pool: one started earlier is not counted)."""
        root = tmp_path / f"imgs{n_per_class}"
        _image_folder(root, n_per_class=n_per_class)
        plan = plan_image_folder(tiny_config({"data.dataset": "image-folder", "data.root": str(root),
                                              "data.image_size": 8}).data)
        before, images, started = pool_processes(), {}, {}
        with Decoder(plan, 8, 3, workers=2) as decoder:
            for name in ("train", "holdout"):
                got = []
                assert decoder.ingest(getattr(plan, name), lambda chunk, labels: got.append(chunk)) == []
                images[name], started[name] = np.concatenate(got), pool_processes() - before
        return plan, images, started

    plan, images, started = decoded(INGEST_CHUNK // 2 + 40)  # 20% held out: training split 2 chunks, holdout 1
    assert len(plan.train) > INGEST_CHUNK >= len(plan.holdout)
    assert {k: len(v) for k, v in images.items()} == {"train": len(plan.train), "holdout": len(plan.holdout)}
    assert len(started["train"]) == 2 and started["holdout"] == started["train"], started
    plan, _, started = decoded(20)  # one chunk per split: decoded here
    assert len(plan.train) + len(plan.holdout) == 40 and started == {"train": set(), "holdout": set()}


def test_accumulated_moments_equal_the_whole_array_statistics():
    rng = np.random.default_rng(0)
    f = rng.normal(50.0, 3.0, (5000, 16)) @ rng.normal(size=(16, 16))  # a large mean, correlated features
    m = refstats.Moments()
    for i in range(0, len(f), 700):
        m.add(f[i:i + 700])
    mu, sigma = m.statistics()
    want_mu, want_sigma = refstats.fid_statistics(f)
    np.testing.assert_allclose(mu, want_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, want_sigma, rtol=1e-9, atol=1e-9)


def test_feature_subset_is_all_rows_or_a_fixed_uniform_draw():
    np.testing.assert_array_equal(refstats.feature_subset(10, 50), np.arange(10))
    a, b = refstats.feature_subset(1000, 100), refstats.feature_subset(1000, 100)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == 100 and (np.diff(a) > 0).all() and a.max() > 800 and a.min() < 200


def test_a_dataset_is_read_in_place_from_a_url(sharded):
    """Shards in object storage are read through pyarrow's file systems; file:// takes the same code path as s3://."""
    ds = open_dataset(sharded.resolve().as_uri())
    assert ds.train.root.startswith("file://") and len(ds.train) == 1000
    np.testing.assert_array_equal(ids_of(ds.train.take([5, 995]).images), [5, 995])
    batches = list(TrainStream(ds.train, 100, 0, 1, seed=0, buffer_rows=300).epoch(0))
    assert len(batches) == 10 and len(np.unique(np.concatenate([ids_of(b) for b in batches]))) == 1000
    with pytest.raises(DataError, match="cannot read the dataset manifest"):
        open_dataset((sharded / "nowhere").resolve().as_uri())


def test_training_reads_a_dataset_url_in_place(tiny_config, tmp_path):
    """The train stage given a URL (what an s3:// dataset looks like) reads the shards through it."""
    from tasks import train

    cfg = tiny_config({**NO_ATTN, "train.steps": 3, "train.batch_size": 16, "train.checkpoint_every": 3})
    fetch.run(cfg, tmp_path / "ds")
    loop = train.run_local(cfg, (tmp_path / "ds").resolve().as_uri(), tmp_path / "ck", tmp_path / "l.tsv", threads=1)
    assert loop.data.startswith("file:///") and (tmp_path / "ck" / "ckpt_00000003.pt").is_file()


@pytest.mark.slow
def test_ray_data_loader_trains_and_resumes_under_ray_train(tiny_config, tmp_path):
    """train.loader: ray-data, two workers on a local Ray: Ray Data reads the shards (its tasks get the CPU the
    workers leave), each worker its part through get_dataset_shard, from a checkpoint mid-epoch and on into the next
    epoch. The checkpoint comes from the same loop in this process: a resumed run's place in the epoch is a function
    of the step alone (tasks/train.py train_loop), whoever wrote it, and a Ray Train fit to write it would only
    repeat what the rerun does."""
    from tasks.train import run_local

    cfg = tiny_config({**NO_ATTN, "train.loader": "ray-data", "train.num_workers": 2, "train.use_gpu": False,
                       "train.steps": 8, "train.checkpoint_every": 4, "train.log_every": 4})
    params = tmp_path / "params.yaml"
    import yaml

    params.write_text(yaml.safe_dump(cfg.to_dict()))
    fetch.run(cfg, tmp_path / "ds")
    # the 2-worker run: 1437 images, batch 64 per worker, 11 steps an epoch: step 8 is mid-epoch, step 12 the next
    run_local(cfg, tmp_path / "ds", tmp_path / "ck", tmp_path / "loss.tsv", threads=1)
    r = subprocess.run([sys.executable, "-m", "tasks.train", "--params", str(params), "--data", str(tmp_path / "ds"),
                        "--checkpoints", str(tmp_path / "ck"), "--log", str(tmp_path / "loss.tsv"),
                        "--metrics", str(tmp_path / "train.json"), "--set", "train.steps=13"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    # a quiet console: the stage says where it runs, and Ray Train's placement-group cleaner, which cannot reach
    # a State API here, is not there to log its failed query every second
    assert "train: 2 Ray Train worker(s), each" in r.stdout
    assert "Failed to query Ray Train Controller" not in r.stdout + r.stderr
    out = json.loads((tmp_path / "train.json").read_text())
    assert out["steps"] == 13 and out["num_workers"] == 2 and out["resumed_from_step"] == 8
    assert np.isfinite(out["final_loss"])
    assert "resuming from step 8" in r.stdout + r.stderr
    rows = (tmp_path / "loss.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in rows[1:]] == ["4", "8", "12", "13"]
