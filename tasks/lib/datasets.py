"""Dataset loaders for the fetch stage: each source read from its official on-disk format into uint8 arrays.

Every loader returns a :class:`Source`: a training split, the official test split when the dataset has one
(``None`` otherwise), class names and where the files came from. :func:`prepare` then applies the ``data.*``
settings in one fixed order (holdout split -> ``max_train`` cap -> resize -> channels) so that the result
depends on the config and the source files only.

Layouts read (``root`` = ``data.root``):

- ``digits``: bundled with scikit-learn, nothing to fetch.
- ``mnist`` / ``fashion-mnist``: the four IDX files in ``<root>/MNIST/raw/`` (``<root>/FashionMNIST/raw/``),
  gzipped (``.gz``) or not; torchvision's layout and reader.
- ``cifar10``: the python-pickle batches in ``<root>/cifar-10-batches-py/`` (the extracted official archive).
- ``image-folder``: every PNG/JPEG under ``<root>``, recursively. When every image sits in a first-level
  subfolder and there are at least two such subfolders, the subfolder names are the classes (torchvision's
  ``ImageFolder`` convention); otherwise the images are unlabeled (label -1).

Missing files raise :class:`~tasks.lib.errors.DataError` naming the files and the folder they belong in; no loader
downloads anything unless ``data.download`` is true *and* files are missing.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ddpm.checkpoint import atomic_write_bytes
from tasks.lib.config import DataConfig

from .errors import DataError
from .shards import Split

# ITU-R BT.601 luma weights, the ones PIL's convert("L") uses.
LUMA = (0.299, 0.587, 0.114)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_RESIZE_CHUNK = 2048  # images per float32 resize batch: bounds memory on CIFAR-sized sets


@dataclass(frozen=True)
class Source:
    """A dataset as read from disk, before the ``data.*`` transforms.

    ``train``/``test`` images are uint8 [N, C, H, W]; ``test`` is None when the dataset has no official test
    split. ``classes`` is empty for unlabeled data. ``source`` says where the files were read (as configured,
    not resolved, so that the fetch output does not depend on the machine).
    """

    train: Split
    test: Optional[Split]
    classes: list[str]
    source: str


@dataclass(frozen=True)
class Prepared:
    """The fetch stage's result: train and holdout splits (uint8 [N, C, H, W], int64 [N]) plus provenance."""

    train: Split
    holdout: Split
    classes: list[str]
    source: str
    split: dict  # how the holdout was made: {"kind": "official-test"} or {"kind": "random-split", ...}

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.train.images.shape[1:])  # type: ignore[return-value]


# -- digits ---------------------------------------------------------------------------------------------------------
def load_digits() -> Source:
    """scikit-learn's bundled 8x8 digits: 1,797 images [1797, 1, 8, 8], values 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    # 16 is the maximum ink level; np.rint keeps the levels exact (8 -> 127.5 -> 128).
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    return Source(Split(images, labels), None, [str(c) for c in bunch.target_names], "sklearn.datasets.load_digits")


# -- MNIST / Fashion-MNIST ------------------------------------------------------------------------------------------
_IDX_MAGIC = {"images": 2051, "labels": 2049}  # 0x0803 (uint8, 3 dims), 0x0801 (uint8, 1 dim)


def _one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line (torchvision's download errors span several)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _mnist_class(dataset: str):
    from torchvision.datasets import MNIST, FashionMNIST

    return {"mnist": MNIST, "fashion-mnist": FashionMNIST}[dataset]


def mnist_files(dataset: str) -> list[str]:
    """The four IDX file names torchvision reads, uncompressed (``train-images-idx3-ubyte``, ...)."""
    return [os.path.splitext(name)[0] for name, _md5 in _mnist_class(dataset).resources]


def mnist_raw_folder(dataset: str, root: str | os.PathLike) -> Path:
    """``<root>/MNIST/raw`` or ``<root>/FashionMNIST/raw``: where torchvision looks for the IDX files."""
    return Path(root) / _mnist_class(dataset).__name__ / "raw"


def mnist_missing(dataset: str, raw: Path) -> list[str]:
    return [n for n in mnist_files(dataset) if not (raw / n).is_file() and not (raw / f"{n}.gz").is_file()]


def _check_idx(path: Path, kind: str, shown: Path) -> int:
    """Validate an uncompressed IDX file's header against its size; return the item count. Errors name
    ``shown``, the user's file (``path`` may be a decompressed copy).

    torchvision's reader only asserts, so a truncated or swapped file would surface as a bare AssertionError.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(16 if kind == "images" else 8)
    except OSError as e:
        raise DataError(f"{shown}: cannot read ({e.strerror or e})") from None
    if len(header) < 8:
        raise DataError(f"{shown}: not an IDX file (only {size} bytes)")
    magic, count = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big")
    if magic != _IDX_MAGIC[kind]:
        raise DataError(f"{shown}: not an IDX {kind} file (magic number {magic}, expected {_IDX_MAGIC[kind]})")
    expected = 8 + count
    if kind == "images":
        if len(header) < 16:
            raise DataError(f"{shown}: truncated IDX header ({size} bytes)")
        rows, cols = int.from_bytes(header[8:12], "big"), int.from_bytes(header[12:16], "big")
        if (rows, cols) != (28, 28):  # data.shape promises the native 28x28 of both datasets
            raise DataError(f"{shown}: holds {rows}x{cols} images, expected 28x28")
        expected = 16 + count * rows * cols
    if size != expected:
        what = "bytes uncompressed" if shown.suffix == ".gz" else "bytes"
        raise DataError(f"{shown}: {size} {what}, but its header describes {expected} (truncated or corrupt)")
    return count


def _stage_mnist(dataset: str, raw: Path, tmp: Path) -> Path:
    """Return a root torchvision can read: the configured one when every IDX file is uncompressed, else ``tmp``
    holding the uncompressed files (links) and the ``.gz`` ones decompressed. torchvision 0.29 reads only
    uncompressed files, and decompressing beside the originals would modify a folder DVC may track as an input."""
    names = mnist_files(dataset)
    if all((raw / n).is_file() for n in names):
        return raw.parent.parent
    staged = tmp / raw.parent.name / "raw"
    staged.mkdir(parents=True)
    for n in names:
        if (raw / n).is_file():
            os.symlink((raw / n).resolve(), staged / n)
            continue
        try:
            with gzip.open(raw / f"{n}.gz", "rb") as src, open(staged / n, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
            raise DataError(f"{raw / (n + '.gz')}: not a readable gzip file ({e})") from None
    return tmp


def load_mnist(dataset: str, root: str | os.PathLike, download: bool = False) -> Source:
    """MNIST or Fashion-MNIST through torchvision: train [60000, 1, 28, 28], official test split [10000, 1, 28, 28].

    ``dataset`` is ``"mnist"`` or ``"fashion-mnist"``. With ``download`` and files missing, torchvision fetches
    them into ``<root>/<Class>/raw``.
    """
    cls = _mnist_class(dataset)
    raw = mnist_raw_folder(dataset, root)
    missing = mnist_missing(dataset, raw)
    if missing and download:
        try:
            cls(str(root), train=True, download=True)  # fetches all four files
        except Exception as e:  # noqa: BLE001 - network and archive errors come in many types
            raise DataError(f"{dataset}: download into {raw} failed: {_one_line(e)}") from None
        missing = mnist_missing(dataset, raw)
    if missing:
        raise DataError(
            f"{dataset}: missing {', '.join(missing)} in {raw}/ (put the four IDX files "
            f"{', '.join(mnist_files(dataset))} there, .gz or not; data.download: true fetches them on a "
            "connected machine)"
        )
    with tempfile.TemporaryDirectory(prefix="fetch-mnist-") as tmp:
        read_root = _stage_mnist(dataset, raw, Path(tmp))
        read_raw = Path(read_root) / cls.__name__ / "raw"
        counts = {}
        for n in mnist_files(dataset):
            shown = raw / n if (raw / n).is_file() else raw / f"{n}.gz"
            counts[n] = _check_idx(read_raw / n, "images" if "images" in n else "labels", shown)
        splits = []
        for train, prefix in ((True, "train"), (False, "t10k")):
            img, lab = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
            if counts[img] != counts[lab]:
                raise DataError(f"{raw}: {img} holds {counts[img]} images but {lab} {counts[lab]} labels")
            try:
                ds = cls(str(read_root), train=train, download=False)
            except (TypeError, ValueError, AssertionError, RuntimeError) as e:
                raise DataError(f"{raw}: unreadable {img} or {lab} ({type(e).__name__}: {e})") from None
            splits.append(Split(ds.data.numpy()[:, None].copy(), ds.targets.numpy().astype(np.int64)))
    return Source(splits[0], splits[1], list(cls.classes), str(raw))


# -- CIFAR-10 -------------------------------------------------------------------------------------------------------
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST = "test_batch"
CIFAR10_META = "batches.meta"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"  # the official archive; extracted from <root> when the folder is missing


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Extract a tar (any compression) or zip archive into ``dest``; return the files written.

    Every member is checked before anything is written: an absolute path, a ``..`` that climbs out of ``dest``,
    a link pointing outside it, or a device file refuses the whole archive (:class:`~tasks.lib.errors.DataError`
    naming the archive and the member), so a crafted archive can neither write outside ``dest`` nor half-extract.
    Tar members go through Python's ``data`` extraction filter (PEP 706), which also drops set-uid bits.
    """
    import tarfile
    import zipfile

    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                target = (root / info.filename).resolve()
                if info.filename.startswith(("/", "\\")) or (target != root and root not in target.parents):
                    raise DataError(f"{archive}: member {info.filename!r} would be written outside {dest}; "
                                    "refusing the archive")
            z.extractall(root)
            return [root / n for n in z.namelist() if not n.endswith("/")]
    try:
        with tarfile.open(archive) as tar:
            members, written = tar.getmembers(), []
            for m in members:
                try:
                    kept = tarfile.data_filter(m, str(root))  # a leading "/" is stripped: it stays inside
                except tarfile.FilterError as e:
                    raise DataError(f"{archive}: member {m.name!r} refused ({e}); refusing the archive") from None
                if kept is not None and kept.isfile():
                    written.append(root / kept.name)
            tar.extractall(root, members=members, filter="data")
            return written
    except (tarfile.TarError, EOFError) as e:  # not tar, truncated, bad compression
        raise DataError(f"{archive}: not a readable tar or zip archive ({type(e).__name__}: {e})") from None


# What the official CIFAR-10 batches hold besides plain dicts, lists, bytes and numbers: numpy arrays.
_PICKLE_GLOBALS = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct",
                                                                                                 "scalar")}
_PICKLE_GLOBALS |= {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # protocol-2 bytes


class _DataUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a batch file that names any other callable (``os.system``,
    ``builtins.eval``, ...) is refused before that callable is even looked up, so reading runs no code."""

    def find_class(self, module: str, name: str):
        if (module, name) in _PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}: only plain data and numpy arrays are read")


def _unpickle(path: Path) -> dict:
    # The official batches are python-2 pickles of dicts with bytes keys.
    try:
        with open(path, "rb") as f:
            obj = _DataUnpickler(f, encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - unpickling raises anything from EOFError to UnpicklingError
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR-10 python batch (a pickled {type(obj).__name__}, expected a dict)")
    return obj


def read_cifar_batch(path: Path) -> Split:
    """One CIFAR-10 batch: ``b'data'`` uint8 [N, 3072] (R, G, B planes, row-major) -> images [N, 3, 32, 32]."""
    batch = _unpickle(path)
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if data is None or labels is None:
        raise DataError(f"{path}: CIFAR-10 batch without b'data' and b'labels' keys (has {sorted(batch)})")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise DataError(
            f"{path}: expected b'data' uint8 [N, 3072] and N b'labels', got {data.dtype} {data.shape} and "
            f"{labels.shape[0] if labels.ndim else 'scalar'} labels"
        )
    return Split(data.reshape(-1, 3, 32, 32), labels)


def cifar10_missing(root: str | os.PathLike) -> list[str]:
    """The python-batch files of CIFAR-10 missing from ``<root>/cifar-10-batches-py``."""
    folder = Path(root) / CIFAR10_FOLDER
    return [n for n in (*CIFAR10_TRAIN, CIFAR10_TEST, CIFAR10_META) if not (folder / n).is_file()]


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root: str | os.PathLike, train: Split, test: Split, classes: Sequence[str] = CIFAR10_CLASSES) -> Path:
    """The inverse of :func:`load_cifar10`, for fixtures and benchmarks (no stage writes it): ``train`` and ``test``
    (uint8 [N, 3, 32, 32]) as the extracted official archive, ``<root>/cifar-10-batches-py/``: the train split in
    five batches, ``test_batch`` and ``batches.meta``, pickled dicts with bytes keys as python 2 wrote them
    (``b'data'`` uint8 [N, 3072] in R, G, B planes, ``b'labels'`` a list of ints). Returns the folder."""
    folder = Path(root) / CIFAR10_FOLDER
    folder.mkdir(parents=True, exist_ok=True)

    def put(name: str, obj: dict) -> None:
        atomic_write_bytes(folder / name, lambda f: pickle.dump(obj, f, protocol=2))

    def batch(label: str, images: np.ndarray, labels: np.ndarray) -> dict:
        data = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), 3 * 32 * 32)
        return {b"batch_label": label.encode(), b"labels": [int(x) for x in labels], b"data": data}

    parts = np.array_split(np.arange(len(train.labels)), len(CIFAR10_TRAIN))
    for i, (name, idx) in enumerate(zip(CIFAR10_TRAIN, parts), 1):
        put(name, batch(f"training batch {i} of 5", train.images[idx], train.labels[idx]))
    put(CIFAR10_TEST, batch("testing batch 1 of 1", test.images, test.labels))
    put(CIFAR10_META, {b"label_names": [c.encode() for c in classes], b"num_cases_per_batch": len(parts[0]),
                        b"num_vis": 3 * 32 * 32})
    return folder


def load_cifar10(root: str | os.PathLike, download: bool = False) -> Source:
    """CIFAR-10 from its python batches: train [50000, 3, 32, 32], official test split [10000, 3, 32, 32]."""
    folder = Path(root) / CIFAR10_FOLDER
    missing = cifar10_missing(root)
    archive = Path(root) / CIFAR10_ARCHIVE
    if missing and download and not archive.is_file():
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import download_url

        try:  # download only; the extraction below is ours, checked member by member
            download_url(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
        except Exception as e:  # noqa: BLE001 - network and archive errors come in many types
            raise DataError(f"cifar10: download into {root} failed: {_one_line(e)}") from None
    if missing and archive.is_file():
        extract_archive(archive, root)
        missing = cifar10_missing(root)
    if missing:
        raise DataError(
            f"cifar10: missing {', '.join(missing)} in {folder}/ (put the official {CIFAR10_ARCHIVE} in {root} "
            "or extract it there; data.download: true fetches it on a connected machine)"
        )
    parts = [read_cifar_batch(folder / n) for n in CIFAR10_TRAIN]
    train = Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))
    test = read_cifar_batch(folder / CIFAR10_TEST)
    names = _unpickle(folder / CIFAR10_META).get(b"label_names")
    if not isinstance(names, (list, tuple)):
        raise DataError(f"{folder / CIFAR10_META}: no b'label_names' list")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return Source(train, test, classes, str(folder))


# -- image folder ---------------------------------------------------------------------------------------------------
def list_images(root: str | os.PathLike) -> list[Path]:
    """Every PNG/JPEG under ``root`` (recursive), sorted by relative path so that the order is reproducible."""
    root = Path(root)
    return sorted(
        (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )


def folder_classes(root: Path, paths: Sequence[Path]) -> tuple[list[str], np.ndarray]:
    """Class names from first-level subfolders, and int64 labels [N]; ([], all -1) when the folder is unlabeled.

    Labeled only when every image sits in a subfolder and there are at least two: one subfolder, or images
    loose at the top, say "a pile of images", not a classification.
    """
    tops = [p.relative_to(root).parts for p in paths]
    if any(len(t) < 2 for t in tops):
        return [], np.full(len(paths), -1, dtype=np.int64)
    classes = sorted({t[0] for t in tops})
    if len(classes) < 2:
        return [], np.full(len(paths), -1, dtype=np.int64)
    index = {c: i for i, c in enumerate(classes)}
    return classes, np.array([index[t[0]] for t in tops], dtype=np.int64)


def _decode(path: Path, mode: str):
    """PIL image in ``mode`` ("RGB" or "L"), EXIF orientation applied; raises OSError/ValueError if unreadable."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)  # phone JPEGs store rotation as a tag; crop what a viewer shows
        return im.convert(mode)  # convert() forces the full decode, so truncated files fail here


def folder_images(root: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """An image folder's files (relative POSIX paths, sorted), their int64 labels and the class names; raises
    :class:`DataError` for a missing folder or one without images."""
    if not root.is_dir():
        raise DataError(f"image-folder: {root} is not a folder (set data.root to the folder of PNG/JPEG images)")
    files = list_images(root)
    if not files:
        raise DataError(f"image-folder: no PNG or JPEG images under {root} (searched recursively)")
    classes, labels = folder_classes(root, files)
    return [f.relative_to(root).as_posix() for f in files], labels, classes


def unreadable(bad: Sequence[str], root: Path) -> str:
    """"N unreadable image file(s) under ROOT: the first five names (+ how many more)"."""
    shown = ", ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
    return f"{len(bad)} unreadable image file(s) under {root}: {shown}"


def load_image_folder(root: str | os.PathLike, image_size: int, channels: int = 3) -> Source:
    """Every PNG/JPEG under ``root``: shorter side resized to ``image_size``, center-cropped -> [N, C, S, S], in
    this process (the fetch stage streams folders instead: :func:`plan_image_folder`, :func:`ingest`).

    Grayscale conversion is PIL's ``convert("L")`` (ITU-R 601 luma). Unreadable files are collected and
    reported together rather than skipped: a silently smaller dataset is worse than an error.
    """
    root = Path(root)
    paths, labels, classes = folder_images(root)
    images, bad = decode_chunk(str(root), paths, image_size, channels)
    if bad:
        raise DataError(f"image-folder: {unreadable([paths[i] for i in bad], root)}")
    return Source(Split(images, labels), None, classes, str(root))


# -- image folders, streamed ----------------------------------------------------------------------------------------
INGEST_CHUNK = 256  # images per decode task


def decode_chunk(root: str, rel_paths: Sequence[str], size: int, channels: int) -> tuple[np.ndarray, list[int]]:
    """Decode, resize and crop images (one task of a parallel ingest): uint8 [n, C, size, size] of the readable
    ones, and the positions in ``rel_paths`` of the unreadable ones."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    mode = "RGB" if channels == 3 else "L"
    out, bad = [], []
    for i, rel in enumerate(rel_paths):
        try:
            im = _decode(Path(root) / rel, mode)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            bad.append(i)
            continue
        out.append(resize_and_crop(F.pil_to_tensor(im)[None], size)[0].numpy())
    images = np.stack(out) if out else np.empty((0, channels, size, size), dtype=np.uint8)
    return images, bad


def _one_thread() -> None:
    """A decode process's start: one torch thread, as there is one process per core already."""
    import torch

    torch.set_num_threads(1)


@dataclass(frozen=True)
class FolderPlan:
    """An image folder's files and their split, decided before any image is decoded (a list of names and labels:
    small beside the pixels)."""

    root: Path
    paths: list[str]  # relative POSIX paths, sorted
    labels: np.ndarray  # int64 [N]
    classes: list[str]
    train: np.ndarray  # indices into paths, ascending
    holdout: np.ndarray
    split: dict


def plan_image_folder(data: DataConfig) -> FolderPlan:
    """List ``data.root``'s images and split them as :func:`prepare` would (holdout, then the ``max_train`` cap)."""
    root = Path(data.root)
    paths, labels, classes = folder_images(root)
    train, holdout, stratified = split_holdout_indices(labels, data.holdout_fraction, data.seed,
                                                       data.stratify_holdout)
    if data.max_train is not None and len(train) > data.max_train:
        rng = np.random.default_rng([data.seed, 0x6D6178])  # the same draw as cap()
        train = train[np.sort(rng.choice(len(train), size=data.max_train, replace=False))]
    how = {"kind": "random-split", "fraction": data.holdout_fraction, "seed": data.seed, "stratified": stratified}
    return FolderPlan(root, paths, labels, classes, train, holdout, how)


class Decoder:
    """Decodes an image folder's chunks for every split of one fetch, in ``workers`` processes started once (a
    decode process's start, with its torch and torchvision imports, costs more than a chunk's work): never more
    processes than the largest split has chunks, and none when that is one (the chunks are decoded in this process).

    ``with Decoder(plan, size, channels, workers) as d: bad = d.ingest(plan.train, sink)``
    """

    def __init__(self, plan: FolderPlan, size: int, channels: int, workers: int):
        self.plan, self.size, self.channels = plan, size, channels
        most = max(len(plan.train), len(plan.holdout))
        self.workers = max(1, min(workers, -(-most // INGEST_CHUNK)))
        self.pool = None

    def __enter__(self) -> "Decoder":
        if self.workers > 1:
            from concurrent.futures import ProcessPoolExecutor
            import multiprocessing as mp

            # forkserver: no copy of this process's threads or torch state in the children
            self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("forkserver"),
                                            initializer=_one_thread)
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None

    def ingest(self, which: np.ndarray, sink, desc: str = "decode") -> list[str]:
        """Decode ``plan.paths[which]`` in chunks and pass each chunk's readable images and labels to
        ``sink(images, labels)`` in order; return the relative paths of the unreadable ones. At most 2 x ``workers``
        chunks are in flight, so memory does not grow with the folder."""
        from collections import deque

        from tqdm import tqdm

        plan = self.plan
        chunks = [which[i:i + INGEST_CHUNK] for i in range(0, len(which), INGEST_CHUNK)]
        bad: list[str] = []
        bar = tqdm(total=len(which), desc=desc, unit="img", disable=None)

        def task(idx):
            return str(plan.root), [plan.paths[int(i)] for i in idx], self.size, self.channels

        def consume(idx, result):
            images, bad_pos = result
            keep = np.ones(len(idx), dtype=bool)
            keep[bad_pos] = False
            bad.extend(plan.paths[int(idx[i])] for i in bad_pos)
            if len(images):
                sink(images, plan.labels[idx[keep]])
            bar.update(len(idx))

        try:
            if self.pool is None:
                for idx in chunks:
                    consume(idx, decode_chunk(*task(idx)))
                return bad
            pending: deque = deque()
            for idx in chunks:
                pending.append((idx, self.pool.submit(decode_chunk, *task(idx))))
                if len(pending) >= 2 * self.workers:
                    i0, fut = pending.popleft()
                    consume(i0, fut.result())
            while pending:
                i0, fut = pending.popleft()
                consume(i0, fut.result())
            return bad
        finally:
            bar.close()


# -- transforms -----------------------------------------------------------------------------------------------------
def resize_and_crop(images, size: int):
    """uint8 tensor [N, C, H, W] -> uint8 [N, C, size, size]: shorter side to ``size`` (antialiased bilinear,
    computed in float32, rounded to the nearest level), then center crop. A no-op at the target size."""
    import torch
    from torchvision.transforms.v2 import functional as F

    if tuple(images.shape[-2:]) == (size, size):
        return images
    x = F.resize(images.to(torch.float32), [size], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    x = F.center_crop(x, [size, size])
    return x.round_().clamp_(0, 255).to(torch.uint8)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, C, H, W] -> uint8 [N, C, size, size] (see :func:`resize_and_crop`), in bounded chunks."""
    if images.shape[-2:] == (size, size):
        return images  # before torch is imported: a fetch at the data's own size needs none (~2 CPU-s)
    import torch

    out = np.empty((len(images), images.shape[1], size, size), dtype=np.uint8)
    for start in range(0, len(images), _RESIZE_CHUNK):
        chunk = torch.from_numpy(images[start : start + _RESIZE_CHUNK])
        out[start : start + len(chunk)] = resize_and_crop(chunk, size).numpy()
    return out


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [N, C, H, W] -> [N, channels, H, W]: gray to RGB repeats the plane; RGB to gray is the ITU-R 601
    luma ``0.299 R + 0.587 G + 0.114 B`` rounded to the nearest level."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return np.repeat(images, 3, axis=1)
    if c == 3 and channels == 1:
        luma = np.tensordot(np.asarray(LUMA, dtype=np.float64), images.astype(np.float64), axes=([0], [1]))
        return np.rint(luma).clip(0, 255).astype(np.uint8)[:, None]
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels")


def split_holdout(split: Split, fraction: float, seed: int, stratify: bool = False) -> tuple[Split, Split, bool]:
    """Seeded random split into (train, holdout, stratified); scikit-learn rounds the holdout size up
    (ceil(fraction * N)). Both parts keep the source order.

    The default is a plain random split: the holdout is then an i.i.d. draw, like a perfect sampler's output, so
    the real-vs-real FID floor measured on it includes the class-proportion noise every generated set has. A
    stratified holdout (``stratify``, when the data is labeled and every class fits on both sides) has exact class
    proportions and gives a floor that no sampler drawing i.i.d. images can expect to reach."""
    train_idx, hold_idx, stratified = split_holdout_indices(split.labels, fraction, seed, stratify)
    take = lambda idx: Split(split.images[idx], split.labels[idx])  # noqa: E731
    return take(train_idx), take(hold_idx), stratified


def split_holdout_indices(labels: np.ndarray, fraction: float, seed: int,
                          stratify: bool = False) -> tuple[np.ndarray, np.ndarray, bool]:
    """:func:`split_holdout` on indices: (train indices, holdout indices, stratified), both ascending."""
    from sklearn.model_selection import train_test_split

    n = len(labels)
    index = np.arange(n)
    labeled = stratify and bool(n) and bool((labels >= 0).all())
    try:
        train_idx, hold_idx = train_test_split(
            index, test_size=fraction, random_state=seed, stratify=labels if labeled else None
        )
        stratified = labeled
    except ValueError:
        # Stratifying needs >= 2 images per class and a holdout at least as large as the class count;
        # small folders fall back to a plain random split rather than failing.
        try:
            train_idx, hold_idx = train_test_split(index, test_size=fraction, random_state=seed)
        except ValueError:
            raise DataError(
                f"cannot split {n} image(s) into train and holdout with data.holdout_fraction {fraction} "
                "(each side needs at least one)"
            ) from None
        stratified = False
    return np.sort(train_idx), np.sort(hold_idx), stratified


def cap(split: Split, max_items: Optional[int], seed: int) -> Split:
    """A seeded random subset of ``max_items`` (source order kept); the split itself when it is small enough."""
    n = len(split.labels)
    if max_items is None or n <= max_items:
        return split
    # A stream separate from the holdout split's, so changing max_train never changes the holdout.
    rng = np.random.default_rng([seed, 0x6D6178])
    idx = np.sort(rng.choice(n, size=max_items, replace=False))
    return Split(split.images[idx], split.labels[idx])


# -- the whole recipe -----------------------------------------------------------------------------------------------
def load_source(data: DataConfig) -> Source:
    """Read ``data.dataset`` from ``data.root`` (or scikit-learn) with no transforms but image-folder's decode."""
    if data.dataset == "digits":
        return load_digits()
    if data.dataset in ("mnist", "fashion-mnist"):
        return load_mnist(data.dataset, data.root, data.download)
    if data.dataset == "cifar10":
        return load_cifar10(data.root, data.download)
    if data.dataset == "image-folder":
        return load_image_folder(data.root, data.image_size, data.shape[0])
    raise ValueError(f"unknown dataset {data.dataset!r}")  # unreachable: the config validates the name


def prepare(data: DataConfig) -> Prepared:
    """Load and transform per ``data.*``: holdout split (datasets without a test split) -> ``max_train`` cap ->
    resize to ``data.image_size`` -> ``data.channels``. Returns splits of shape ``data.shape``."""
    src = load_source(data)
    if src.test is not None:
        train, holdout, how = src.train, src.test, {"kind": "official-test"}
    else:
        train, holdout, stratified = split_holdout(src.train, data.holdout_fraction, data.seed, data.stratify_holdout)
        how = {"kind": "random-split", "fraction": data.holdout_fraction, "seed": data.seed,
               "stratified": stratified}
    train = cap(train, data.max_train, data.seed)
    c, size, _ = data.shape

    def finish(s: Split) -> Split:
        images = convert_channels(resize_images(s.images, size), c)
        return Split(np.ascontiguousarray(images), s.labels.astype(np.int64))

    out = Prepared(finish(train), finish(holdout), src.classes, src.source, how)
    assert out.shape == data.shape, (out.shape, data.shape)  # a bug here, not a user error
    return out
