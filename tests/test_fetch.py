"""The fetch stage on fixture files in the real on-disk formats: IDX (MNIST, Fashion-MNIST, gz and not),
CIFAR-10 python pickles, a folder of PNG/JPEG files; plus the bundled digits and the command line's errors."""

from __future__ import annotations

import hashlib

import gzip
import os
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tasks import fetch
from tasks.lib import datasets
from tasks.lib import shards
from tasks.lib.shards import load_dataset
from tasks.lib.errors import DataError
from tasks.lib.shards import Split

REPO = Path(__file__).resolve().parents[1]
MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
NO_ATTN = {"model.attn_resolutions": []}  # the tiny UNet's attention at 4 px only exists for 8 px images


# -- fixture writers (the real formats) -----------------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    """IDX: big-endian magic 0x0800 | ndim (2051 images, 2049 labels), big-endian dims, then uint8 data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    blob = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(blob)
    else:
        path.write_bytes(blob)


def make_mnist(root: Path, folder: str = "MNIST", gz: bool = False, n_train: int = 6, n_test: int = 4, seed: int = 0):
    """Write the four IDX files under ``root/folder/raw``; return (train images, labels, test images, labels)."""
    rng = np.random.default_rng(seed)
    tr = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    tr[0] = (np.arange(28 * 28) % 256).reshape(28, 28)  # a known image: pixel (h, w) = (28h + w) mod 256
    te = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    trl = np.arange(n_train, dtype=np.uint8) % 10
    tel = (np.arange(n_test, dtype=np.uint8) * 3) % 10
    raw = root / folder / "raw"
    for name, arr in zip(MNIST_FILES, (tr, trl, te, tel)):
        write_idx(raw / name, arr, gz)
    return tr, trl, te, tel


CIFAR_CLASSES = datasets.CIFAR10_CLASSES


def make_cifar(root: Path, per_batch: int = 2, n_test: int = 3):
    """The extracted cifar-10-python.tar.gz layout (tasks.lib.datasets.write_cifar10): 5 train batches of
    ``per_batch``, test_batch, batches.meta. Returns (train_data [N, 3072], train_labels, test_data, test_labels)."""
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (5 * per_batch, 3072), dtype=np.uint8)
    data[0] = np.arange(3072) % 256  # known image: [c, h, w] = (1024c + 32h + w) mod 256
    labels = rng.integers(0, 10, 5 * per_batch)
    td = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    tl = rng.integers(0, 10, n_test)
    datasets.write_cifar10(root, Split(data.reshape(-1, 3, 32, 32), labels), Split(td.reshape(-1, 3, 32, 32), tl))
    return data, labels, td, tl


def rgb_image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def config(tiny_config, **overrides):
    """A tiny config with dotted overrides given as keyword arguments with '__' for '.'."""
    return tiny_config({**NO_ATTN, **{k.replace("__", "."): v for k, v in overrides.items()}})


def read_back(out: Path):
    art = load_dataset(out)
    return art.train, art.holdout, art.meta


# -- digits ---------------------------------------------------------------------------------------------------------
def test_digits_default_holdout_is_a_plain_random_draw(tiny_config, tmp_path):
    meta = fetch.run(tiny_config(), tmp_path / "ds")
    train, hold, _ = read_back(tmp_path / "ds")
    assert meta["count"] == {"train": 1437, "holdout": 360}
    assert meta["holdout"] == {"kind": "random-split", "fraction": 0.2, "seed": 0, "stratified": False}
    counts = np.bincount(hold.labels, minlength=10)
    # i.i.d.: class counts vary like a multinomial draw instead of being pinned to 36 each.
    assert counts.sum() == 360 and counts.min() > 0 and counts.max() - counts.min() > 2
    assert not np.array_equal(counts, np.bincount(read_stratified(tiny_config, tmp_path), minlength=10))


def read_stratified(tiny_config, tmp_path):
    fetch.run(tiny_config({"data.stratify_holdout": True}), tmp_path / "strat")
    return read_back(tmp_path / "strat")[1].labels


def test_digits_split_is_stratified_complete_and_exact(tiny_config, tmp_path):
    from sklearn.datasets import load_digits

    meta = fetch.run(tiny_config({"data.stratify_holdout": True}), tmp_path / "ds")
    train, hold, saved = read_back(tmp_path / "ds")
    assert saved == meta
    # scikit-learn rounds the holdout up: ceil(0.2 * 1797) = 360.
    assert meta["count"] == {"train": 1437, "holdout": 360}
    assert train.images.shape == (1437, 1, 8, 8) and hold.images.shape == (360, 1, 8, 8)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    assert meta["shape"] == [1, 8, 8] and meta["num_classes"] == 10 and meta["classes"] == [str(i) for i in range(10)]
    assert meta["holdout"] == {"kind": "random-split", "fraction": 0.2, "seed": 0, "stratified": True}
    # Every class on both sides, in proportion (within one image).
    sk = load_digits()
    per_class = np.bincount(sk.target, minlength=10)
    held = np.bincount(hold.labels, minlength=10)
    assert (held > 0).all() and (np.bincount(train.labels, minlength=10) > 0).all()
    assert np.abs(held - 0.2 * per_class).max() <= 1
    # The two splits are exactly the 1,797 sklearn images, 0..16 scaled to 0..255 (8 -> 127.5 -> 128).
    expected = np.rint(sk.images * 255 / 16).astype(np.uint8)
    want = Counter((img.tobytes(), int(lab)) for img, lab in zip(expected, sk.target))
    got = Counter((img[0].tobytes(), int(lab)) for s in (train, hold) for img, lab in zip(s.images, s.labels))
    assert got == want
    assert train.images.max() == 255 and train.images.min() == 0
    assert set(np.unique(train.images)) <= {int(np.rint(k * 255 / 16)) for k in range(17)}
    # The content hash is of the pixels and labels, in order, whatever the shards: recomputed here from the arrays.
    digest = lambda a: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()  # noqa: E731
    assert meta["sha256"] == shards.content_sha256(meta["shape"], {
        name: {"count": len(s.labels), "images_sha256": digest(s.images), "labels_sha256": digest(s.labels)}
        for name, s in (("train", train), ("holdout", hold))})
    assert (tmp_path / "ds" / "config.json").is_file()


def test_digits_seed_changes_the_split_and_runs_are_reproducible(tiny_config, tmp_path):
    a = fetch.run(tiny_config(), tmp_path / "a")
    b = fetch.run(tiny_config(), tmp_path / "b")
    c = fetch.run(tiny_config({"data.seed": 1}), tmp_path / "c")
    assert a["sha256"] == b["sha256"]
    for split in ("train", "holdout"):
        assert (tmp_path / "a" / split / "part-00000.parquet").read_bytes() == \
            (tmp_path / "b" / split / "part-00000.parquet").read_bytes()
    assert c["sha256"] != a["sha256"] and c["count"] == a["count"]


def test_max_train_caps_train_only_and_is_deterministic(tiny_config, tmp_path):
    fetch.run(tiny_config(), tmp_path / "full")
    full_train, full_hold, _ = read_back(tmp_path / "full")
    m1 = fetch.run(tiny_config({"data.max_train": 100}), tmp_path / "m1")
    m2 = fetch.run(tiny_config({"data.max_train": 100}), tmp_path / "m2")
    train, hold, _ = read_back(tmp_path / "m1")
    assert m1["count"] == {"train": 100, "holdout": 360} and m1["max_train"] == 100
    assert m1["sha256"] == m2["sha256"]
    np.testing.assert_array_equal(hold.images, full_hold.images)  # the cap never moves the holdout
    # A subset of the uncapped train split, in its order.
    rows = {(img.tobytes(), int(lab)): i for i, (img, lab) in enumerate(zip(full_train.images, full_train.labels))}
    idx = [rows[(img.tobytes(), int(lab))] for img, lab in zip(train.images, train.labels)]
    assert idx == sorted(idx) and len(set(idx)) == 100
    big = fetch.run(tiny_config({"data.max_train": 5000}), tmp_path / "big")
    assert big["count"]["train"] == 1437


def test_digits_resize_and_channels(tiny_config, tmp_path):
    meta = fetch.run(config(tiny_config, data__image_size=16, data__channels=3), tmp_path / "ds")
    train, hold, _ = read_back(tmp_path / "ds")
    assert meta["shape"] == [3, 16, 16]
    assert train.images.shape == (1437, 3, 16, 16) and hold.images.shape == (360, 3, 16, 16)
    # Gray -> RGB repeats one plane.
    np.testing.assert_array_equal(train.images[:, 0], train.images[:, 1])
    np.testing.assert_array_equal(train.images[:, 0], train.images[:, 2])


# -- MNIST / Fashion-MNIST ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dataset,folder,gz",
    [("mnist", "MNIST", False), ("mnist", "MNIST", True), ("fashion-mnist", "FashionMNIST", True),
     ("fashion-mnist", "FashionMNIST", False)],
)
def test_mnist_family_reads_idx_files(tiny_config, tmp_path, dataset, folder, gz):
    tr, trl, te, tel = make_mnist(tmp_path / "raw", folder, gz)
    before = sorted(os.listdir(tmp_path / "raw" / folder / "raw"))
    meta = fetch.run(config(tiny_config, data__dataset=dataset, data__root=str(tmp_path / "raw")), tmp_path / "ds")
    train, hold, _ = read_back(tmp_path / "ds")
    assert train.images.shape == (6, 1, 28, 28) and hold.images.shape == (4, 1, 28, 28)  # official test = holdout
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    np.testing.assert_array_equal(train.images[:, 0], tr)
    np.testing.assert_array_equal(hold.images[:, 0], te)
    assert train.images[0, 0, 3, 5] == (28 * 3 + 5) % 256
    assert train.labels.tolist() == trl.tolist() and hold.labels.tolist() == tel.tolist()
    assert meta["count"] == {"train": 6, "holdout": 4} and meta["holdout"] == {"kind": "official-test"}
    assert meta["num_classes"] == 10
    assert meta["classes"][0] == ("0 - zero" if dataset == "mnist" else "T-shirt/top")
    assert meta["source"] == str(tmp_path / "raw" / folder / "raw")
    # Reading .gz files decompresses elsewhere: the source folder (perhaps a DVC input) is left as it was.
    assert sorted(os.listdir(tmp_path / "raw" / folder / "raw")) == before


def test_mnist_hash_tracks_content(tiny_config, tmp_path):
    tr, trl, te, tel = make_mnist(tmp_path / "raw")
    cfg = config(tiny_config, data__dataset="mnist", data__root=str(tmp_path / "raw"))
    a, b = fetch.run(cfg, tmp_path / "a"), fetch.run(cfg, tmp_path / "b")
    assert a["sha256"] == b["sha256"]
    tr[2, 10, 10] ^= 1  # one pixel, one bit
    write_idx(tmp_path / "raw" / "MNIST" / "raw" / MNIST_FILES[0], tr)
    c = fetch.run(cfg, tmp_path / "c")
    assert c["sha256"] != a["sha256"]


def test_mnist_resize_channels_and_cap(tiny_config, tmp_path):
    tr, *_ = make_mnist(tmp_path / "raw", n_train=8)
    tr[:] = 200  # a constant image stays constant under any resize
    write_idx(tmp_path / "raw" / "MNIST" / "raw" / MNIST_FILES[0], tr)
    cfg = config(tiny_config, data__dataset="mnist", data__root=str(tmp_path / "raw"), data__image_size=14,
                 data__channels=3, data__max_train=5)
    meta = fetch.run(cfg, tmp_path / "ds")
    train, hold, _ = read_back(tmp_path / "ds")
    assert meta["shape"] == [3, 14, 14] == list(cfg.data.shape)
    assert train.images.shape == (5, 3, 14, 14) and hold.images.shape == (4, 3, 14, 14)
    assert (train.images == 200).all()


def test_mnist_missing_files_are_named(tiny_config, tmp_path):
    make_mnist(tmp_path / "raw")
    raw = tmp_path / "raw" / "MNIST" / "raw"
    (raw / "t10k-labels-idx1-ubyte").unlink()
    cfg = config(tiny_config, data__dataset="mnist", data__root=str(tmp_path / "raw"))
    with pytest.raises(DataError) as e:
        fetch.run(cfg, tmp_path / "ds")
    msg = str(e.value)
    assert "missing t10k-labels-idx1-ubyte in" in msg and str(raw) in msg and "data.download: true" in msg
    assert "missing train-images" not in msg
    assert not (tmp_path / "ds").exists()


def test_mnist_malformed_files_are_named(tiny_config, tmp_path):
    tr, trl, te, tel = make_mnist(tmp_path / "raw")
    raw = tmp_path / "raw" / "MNIST" / "raw"
    cfg = config(tiny_config, data__dataset="mnist", data__root=str(tmp_path / "raw"))
    write_idx(raw / "train-labels-idx1-ubyte", trl[:5])  # 6 images, 5 labels
    with pytest.raises(DataError, match="holds 6 images but train-labels-idx1-ubyte 5 labels"):
        fetch.run(cfg, tmp_path / "ds")
    (raw / "train-labels-idx1-ubyte").write_bytes((raw / "t10k-images-idx3-ubyte").read_bytes())  # swapped file
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: not an IDX labels file \(magic number 2051"):
        fetch.run(cfg, tmp_path / "ds")
    write_idx(raw / "train-labels-idx1-ubyte", trl)
    (raw / "t10k-images-idx3-ubyte").write_bytes((raw / "t10k-images-idx3-ubyte").read_bytes()[:-7])
    msg = r"t10k-images-idx3-ubyte: 3145 bytes, but its header describes 3152 \(truncated or corrupt\)"
    with pytest.raises(DataError, match=msg):
        fetch.run(cfg, tmp_path / "ds")


def test_mnist_malformed_gz_files_are_named(tiny_config, tmp_path):
    tr, trl, te, tel = make_mnist(tmp_path / "raw", "FashionMNIST", gz=True)
    raw = tmp_path / "raw" / "FashionMNIST" / "raw"
    cfg = config(tiny_config, data__dataset="fashion-mnist", data__root=str(tmp_path / "raw"))
    write_idx(raw / "train-images-idx3-ubyte", tr[:, :, :27], gz=True)  # valid IDX, but not 28x28
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: holds 28x27 images, expected 28x28"):
        fetch.run(cfg, tmp_path / "ds")
    write_idx(raw / "train-images-idx3-ubyte", tr, gz=True)
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: not a readable gzip file"):
        fetch.run(cfg, tmp_path / "ds")
    with gzip.open(raw / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, 4) + bytes(3))  # one label short
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: 11 bytes uncompressed, but its header "):
        fetch.run(cfg, tmp_path / "ds")


# -- CIFAR-10 -------------------------------------------------------------------------------------------------------
def test_cifar10_reads_python_batches(tiny_config, tmp_path):
    d, lab, td, tl = make_cifar(tmp_path / "raw")
    meta = fetch.run(config(tiny_config, data__dataset="cifar10", data__root=str(tmp_path / "raw")), tmp_path / "ds")
    train, hold, _ = read_back(tmp_path / "ds")
    assert train.images.shape == (10, 3, 32, 32) and hold.images.shape == (3, 3, 32, 32)
    assert meta["count"] == {"train": 10, "holdout": 3} and meta["shape"] == [3, 32, 32]
    np.testing.assert_array_equal(train.images.reshape(10, -1), d)
    np.testing.assert_array_equal(hold.images.reshape(3, -1), td)
    assert train.images[0, 2, 1, 3] == (1024 * 2 + 32 * 1 + 3) % 256  # blue plane, row 1, column 3
    assert train.labels.tolist() == lab.tolist() and hold.labels.tolist() == tl.tolist()
    assert meta["classes"] == CIFAR_CLASSES and meta["num_classes"] == 10


def test_cifar10_to_gray_uses_601_luma(tiny_config, tmp_path):
    d, *_ = make_cifar(tmp_path / "raw")
    fetch.run(config(tiny_config, data__dataset="cifar10", data__root=str(tmp_path / "raw"), data__channels=1),
              tmp_path / "ds")
    train, _, meta = read_back(tmp_path / "ds")
    assert train.images.shape == (10, 1, 32, 32) and meta["shape"] == [1, 32, 32]
    rgb = d.reshape(10, 3, 32, 32).astype(np.float64)
    want = np.rint(0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).astype(np.uint8)
    np.testing.assert_array_equal(train.images[:, 0], want)


def test_cifar10_missing_and_corrupt(tiny_config, tmp_path):
    cfg = config(tiny_config, data__dataset="cifar10", data__root=str(tmp_path / "raw"))
    with pytest.raises(DataError, match=r"missing data_batch_1, .*test_batch, batches.meta in .*cifar-10-batches-py"):
        fetch.run(cfg, tmp_path / "ds")
    make_cifar(tmp_path / "raw")
    (tmp_path / "raw" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3: not a CIFAR-10 python batch"):
        fetch.run(cfg, tmp_path / "ds")


# -- image folder ---------------------------------------------------------------------------------------------------
def test_image_folder_decodes_crops_and_reports_bad_files(tiny_config, tmp_path):
    root = tmp_path / "imgs"
    (root / "more").mkdir(parents=True)
    a = rgb_image(8, 8, 0)
    Image.fromarray(a).save(root / "a.png")
    wide = rgb_image(8, 16, 1)
    Image.fromarray(wide).save(root / "more" / "wide.png")
    Image.fromarray(rgb_image(12, 12, 2)).save(root / "c.JPG", quality=90)
    Image.fromarray(rgb_image(8, 8, 3)[..., 0]).save(root / "gray.png")  # L images become RGB
    (root / "notes.txt").write_text("not an image")  # ignored: not PNG/JPEG
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    cfg = config(tiny_config, data__dataset="image-folder", data__root=str(root), data__image_size=8,
                 data__holdout_fraction=0.25)
    with pytest.raises(DataError, match=r"1 unreadable image file\(s\) under .*imgs: broken.png \(data.bad_images: skip"):
        fetch.run(cfg, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()
    (root / "broken.png").unlink()

    # Unsplit decode, to check pixels in source order (a.png, c.JPG, gray.png, more/wide.png).
    src = datasets.load_image_folder(root, 8, 3)
    assert src.train.images.shape == (4, 3, 8, 8) and src.classes == [] and (src.train.labels == -1).all()
    np.testing.assert_array_equal(src.train.images[0], a.transpose(2, 0, 1))  # exact at the native size
    np.testing.assert_array_equal(src.train.images[3], wide[:, 4:12].transpose(2, 0, 1))  # center crop
    np.testing.assert_array_equal(src.train.images[2, 0], src.train.images[2, 1])

    meta = fetch.run(cfg, tmp_path / "ds")
    train, hold, _ = read_back(tmp_path / "ds")
    assert meta["count"] == {"train": 3, "holdout": 1} and meta["num_classes"] == 0 and meta["classes"] == []
    assert meta["holdout"]["stratified"] is False
    assert train.images.shape == (3, 3, 8, 8) and (hold.labels == -1).all()
    assert fetch.run(cfg, tmp_path / "again")["sha256"] == meta["sha256"]


def test_image_folder_gray_and_class_subfolders(tiny_config, tmp_path):
    root = tmp_path / "imgs"
    for k, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rgb_image(16, 16, 10 * k + i)).save(root / cls / f"{i}.png")
    cfg = config(tiny_config, data__dataset="image-folder", data__root=str(root), data__image_size=8,
                 data__channels=1, data__holdout_fraction=0.25, data__stratify_holdout=True)
    meta = fetch.run(cfg, tmp_path / "ds")
    train, hold, _ = read_back(tmp_path / "ds")
    assert meta["classes"] == ["cat", "dog"] and meta["num_classes"] == 2 and meta["shape"] == [1, 8, 8]
    assert train.images.shape == (6, 1, 8, 8) and hold.images.shape == (2, 1, 8, 8)
    assert sorted(hold.labels.tolist()) == [0, 1]  # stratified: one of each class held out
    assert meta["holdout"]["stratified"] is True


def test_image_folder_small_classes_fall_back_to_a_random_split(tiny_config, tmp_path):
    root = tmp_path / "imgs"
    for cls, n in (("cat", 1), ("dog", 4)):  # one cat cannot sit on both sides of a stratified split
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rgb_image(8, 8, i)).save(root / cls / f"{i}.png")
    cfg = config(tiny_config, data__dataset="image-folder", data__root=str(root), data__image_size=8,
                 data__stratify_holdout=True)
    meta = fetch.run(cfg, tmp_path / "ds")
    assert meta["count"] == {"train": 4, "holdout": 1} and meta["classes"] == ["cat", "dog"]
    assert meta["holdout"] == {"kind": "random-split", "fraction": 0.2, "seed": 0, "stratified": False}
    for p in list(root.rglob("*.png"))[1:]:
        p.unlink()
    with pytest.raises(DataError, match=r"cannot split 1 image\(s\) into train and holdout"):
        fetch.run(cfg, tmp_path / "ds")
    assert load_dataset(tmp_path / "ds").meta == meta  # the failed fetch left the previous outputs alone


def test_image_folder_empty_and_missing(tiny_config, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    cfg = config(tiny_config, data__dataset="image-folder", data__root=str(tmp_path / "empty"), data__image_size=8)
    with pytest.raises(DataError, match="no PNG or JPEG images under"):
        fetch.run(cfg, tmp_path / "ds")
    cfg = config(tiny_config, data__dataset="image-folder", data__root=str(tmp_path / "nope"), data__image_size=8)
    with pytest.raises(DataError, match="is not a folder"):
        fetch.run(cfg, tmp_path / "ds")


# -- command line ---------------------------------------------------------------------------------------------------
def _cli(cfg, tmp_path: Path, *args: str, python: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.to_dict()))  # a resolved config is a valid params file
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, *python, "-m", "tasks.fetch", "--params", str(params), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )


def test_cli_fetches_digits(tiny_config, tmp_path):
    r = _cli(config(tiny_config), tmp_path, "--out", str(tmp_path / "ds"), python=("-X", "importtime"))
    assert r.returncode == 0, r.stderr
    assert "fetch: digits 1437 train + 360 holdout images [1, 8, 8], 10 classes" in r.stdout
    assert load_dataset(tmp_path / "ds").meta["count"] == {"train": 1437, "holdout": 360}
    # Images at the params' size need no resizing, and the stage does not import torch for it (~2 CPU-s a fetch).
    imported = {line.rpartition("|")[2].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "numpy" in imported and "torch" not in imported


def test_cli_missing_mnist_exits_2_and_keeps_previous_outputs(tiny_config, tmp_path):
    out = tmp_path / "ds"
    fetch.run(tiny_config(), out)  # a previous, good fetch
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    root = tmp_path / "raw"
    r = _cli(config(tiny_config), tmp_path, "--out", str(out), "--set", "data.dataset=mnist",
             "--set", f"data.root={root}")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0].startswith("error: mnist: missing train-images-idx3-ubyte")
    assert str(root / "MNIST" / "raw") in lines[0]
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.glob(".ds.staging-*"))  # the failed fetch's staging folder is gone
