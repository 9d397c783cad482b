"""The dataset artifact: each split as Parquet shards, and a manifest, so that no stage needs a whole split in memory.

Layout of a dataset folder (written by the fetch stage)::

    dataset.json              the manifest (written last: a folder with one is complete)
    train/part-00000.parquet  shards of the training split, in order
    holdout/part-00000.parquet
    config.json               the resolved config of the fetch

Each shard is a Parquet file with two columns: ``image`` (fixed-size binary: the uint8 pixels of one [C, H, W]
image, C-order) and ``label`` (int64, -1 when unlabeled), cut into row groups of about :data:`ROW_GROUP_BYTES`.
A row group is the unit a reader decodes, so it bounds what one read holds. The manifest (``format``
:data:`FORMAT`) has the counts, shape and labels of the dataset, and for each split its shards with their row
counts, row-group sizes and SHA-256 (of the file); ``sha256`` is the content hash of the pixels and labels, computed while writing.

Why Parquet (BENCHMARKS.md "Loader", the loader study): raw pixels in a fixed-size binary column
decode with one ``np.frombuffer`` (no image codec), the files carry their own row counts and row groups (random
access to a group without reading the rest), Ray Data and every dataframe tool read them, and pyarrow reads them
from object storage (``s3://``) as it reads them from disk.

A dataset folder of the old layout (one ``train.npz`` and ``holdout.npz``) is refused with one line that says how
to re-fetch it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import queue
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from ddpm.checkpoint import atomic_write_bytes

from .errors import DataError
from .files import read_json, sha256_file


# The images and labels of a split, and a dataset's manifest, in memory.
@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N]; -1 where unknown


class DatasetMeta:
    """What a dataset's manifest (``meta``, its dataset.json) says of its images."""

    meta: dict[str, Any]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["shape"])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes") or 0)


@dataclass(frozen=True)
class DatasetArtifact(DatasetMeta):
    """A dataset read whole into memory: for the consumers that need it so and are small (the classifier)."""

    train: Split
    holdout: Split
    meta: dict[str, Any]


FORMAT = "ddpm-parquet-shards/1"
SPLITS = ("train", "holdout")
SHARD_BYTES = 64 << 20  # pixels per shard file, about: a few files for CIFAR-10, ~9,000 for LSUN bedroom at 256^2
ROW_GROUP_BYTES = 4 << 20  # pixels per row group, about: the unit a reader decodes
OLD_LAYOUT = ("train.npz", "holdout.npz")


def rows_for(image_bytes: int, budget: int) -> int:
    """How many images of ``image_bytes`` fit ``budget`` bytes (at least one)."""
    return max(1, budget // max(1, image_bytes))


def refetch_hint(folder: Path) -> str:
    return (f"re-fetch it: `dvc repro fetch`, or `python -m tasks.fetch --params params.yaml --out {folder}`")


# -- writing ---------------------------------------------------------------------------------------------------------
class SplitWriter:
    """Append uint8 images [n, C, H, W] and labels [n] to one split's shards, hashing them as they pass.

    Shards are written into ``folder`` (created), each through a temporary name and a rename; :meth:`close`
    returns the split's manifest entry. Memory: at most one shard of pixels is held.
    """

    def __init__(self, folder: os.PathLike | str, shape: Sequence[int], shard_images: Optional[int] = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shape = tuple(int(s) for s in shape)
        self.image_bytes = int(np.prod(self.shape))
        self.shard_images = shard_images or rows_for(self.image_bytes, SHARD_BYTES)
        self.row_group = min(self.shard_images, rows_for(self.image_bytes, ROW_GROUP_BYTES))
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_rows = 0
        self._shards: list[dict[str, Any]] = []
        self._h_images, self._h_labels = hashlib.sha256(), hashlib.sha256()
        self.count = 0

    def add(self, images: np.ndarray, labels: np.ndarray) -> None:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        if tuple(images.shape[1:]) != self.shape or labels.shape != (len(images),):
            raise ValueError(f"images {images.shape} / labels {labels.shape} do not match shape {self.shape}")
        self._h_images.update(images.tobytes())
        self._h_labels.update(labels.tobytes())
        self.count += len(images)
        start = 0
        while start < len(images):
            take = min(len(images) - start, self.shard_images - self._pending_rows)
            self._pending.append((images[start:start + take], labels[start:start + take]))
            self._pending_rows += take
            start += take
            if self._pending_rows == self.shard_images:
                self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._pending_rows:
            return
        images = np.concatenate([p[0] for p in self._pending]) if len(self._pending) > 1 else self._pending[0][0]
        labels = np.concatenate([p[1] for p in self._pending]) if len(self._pending) > 1 else self._pending[0][1]
        self._pending, self._pending_rows = [], 0
        n = len(images)
        col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(self.image_bytes), n,
                                                   [None, pa.py_buffer(np.ascontiguousarray(images))])
        table = pa.table({"image": col, "label": pa.array(labels, type=pa.int64())})
        name = f"part-{len(self._shards):05d}.parquet"
        # No compression: decoding then costs nothing (measured: BENCHMARKS.md "Loader"). Written through a
        # temporary file and a rename, like every output.
        atomic_write_bytes(self.folder / name, lambda f: pq.write_table(
            table, f, row_group_size=self.row_group, compression="none", write_statistics=False))
        groups = [self.row_group] * (n // self.row_group) + ([n % self.row_group] if n % self.row_group else [])
        self._shards.append({"file": name, "rows": n, "row_groups": groups, "sha256": sha256_file(self.folder / name)})

    def close(self) -> dict[str, Any]:
        self._flush()
        return {"count": self.count, "shards": self._shards,
                "images_sha256": self._h_images.hexdigest(), "labels_sha256": self._h_labels.hexdigest()}


def content_sha256(shape: Sequence[int], splits: dict[str, dict[str, Any]]) -> str:
    """The dataset's content hash: shape, and each split's count and pixel and label hashes (from the writers)."""
    h = hashlib.sha256(f"{FORMAT} {list(shape)}".encode())
    for name in SPLITS:
        s = splits[name]
        h.update(f" {name} {s['count']} {s['images_sha256']} {s['labels_sha256']}".encode())
    return h.hexdigest()


def manifest_fields(shape: Sequence[int], written: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The manifest's fields that the writers decide: format, counts, shape, each split's shards, content hash
    (``written``: each split's :meth:`SplitWriter.close`)."""
    return {"format": FORMAT, "count": {s: written[s]["count"] for s in SPLITS}, "shape": list(shape),
            "splits": {s: {"count": written[s]["count"], "shards": written[s]["shards"]} for s in SPLITS},
            "sha256": content_sha256(shape, written)}


def publish(staging: Path, out: Path, manifest: dict[str, Any], extra: Sequence[str] = ()) -> None:
    """Move a finished dataset from ``staging`` into ``out``: the old manifest goes first (so that an interruption
    leaves an incomplete folder, never a mix that looks complete), then the old splits, then the new ones, and the
    new manifest last."""
    from .files import write_json

    (out / "dataset.json").unlink(missing_ok=True)
    for name in (*OLD_LAYOUT, *extra):
        (out / name).unlink(missing_ok=True)
    for split in SPLITS:
        shutil.rmtree(out / split, ignore_errors=True)
        os.replace(staging / split, out / split)
    for name in extra:
        if (staging / name).exists():
            os.replace(staging / name, out / name)
    shutil.rmtree(staging, ignore_errors=True)
    write_json(out / "dataset.json", manifest)


def write_dataset(out: os.PathLike | str, train: Split, holdout: Split, meta: dict[str, Any],
                  shard_images: Optional[int] = None) -> dict[str, Any]:
    """Write in-memory splits as a dataset folder (staged beside ``out``, then published); ``meta`` gains the
    manifest's ``format``, ``count``, ``shape``, ``splits`` and ``sha256``. Returns the manifest written."""
    out = Path(out)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shape = tuple(int(d) for d in train.images.shape[1:])
        written = {}
        for name, split in (("train", train), ("holdout", holdout)):
            w = SplitWriter(staging / name, shape, shard_images)
            w.add(split.images, split.labels)
            written[name] = w.close()
        manifest = {**meta, **manifest_fields(shape, written)}
        out.mkdir(parents=True, exist_ok=True)
        publish(staging, out, manifest)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- reading ---------------------------------------------------------------------------------------------------------
def _decode_images(column, shape: tuple[int, ...]) -> np.ndarray:
    """A fixed-size-binary Arrow column -> uint8 [n, C, H, W] (zero-copy for a single chunk)."""
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    size = int(np.prod(shape))
    parts = []
    for c in chunks:
        buf = np.frombuffer(c.buffers()[1], dtype=np.uint8)
        parts.append(buf[c.offset * size:(c.offset + len(c)) * size])
    flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return flat.reshape(-1, *shape)


@dataclass(frozen=True)
class Group:
    """One row group of one shard: where it is and which rows of the split it holds."""

    file: str
    index: int  # the row group's number within its file
    start: int  # its first row within the split
    rows: int


@dataclass
class SplitReader:
    """One split of a sharded dataset, read a row group at a time.

    ``len()``, ``shape`` (C, H, W) and ``[i]`` (uint8 [C, H, W], one row group cached, so reading in order touches
    each group once) make it a drop-in source for :class:`tasks.lib.scoring.UInt8Images`.
    """

    root: str  # the split's folder: a path or a URL pyarrow reads (s3://...)
    shape: tuple[int, int, int]
    shards: list[dict[str, Any]]
    groups: list[Group] = field(default_factory=list)
    # file name -> a Ray object holding the file's bytes: the split as the driver shipped it (:func:`ship_split`),
    # read from Ray's object store instead of ``root``
    objects: Optional[dict[str, Any]] = None
    _cache: Optional[tuple[int, np.ndarray, np.ndarray]] = field(default=None, repr=False)
    _file: Optional[tuple[str, Any]] = field(default=None, repr=False)

    def __post_init__(self):
        if not self.groups:
            self.groups = self._index()

    def path(self, file: str) -> str:
        return f"{self.root.rstrip('/')}/{file}"

    def _open(self, file: str):
        import pyarrow.parquet as pq

        try:
            if self.objects is not None:  # shipped: the file's bytes, zero-copy from this node's object store
                import pyarrow as pa
                import ray

                return pq.ParquetFile(pa.BufferReader(pa.py_buffer(ray.get(self.objects[file]))))
            if is_url(self.root):  # s3://, gs://, file://...: pyarrow's file systems
                fs, path = _filesystem(self.path(file))
                return pq.ParquetFile(fs.open_input_file(path))
            return pq.ParquetFile(self.path(file))
        except FileNotFoundError:
            raise DataError(f"{self.path(file)}: dataset shard not found; {refetch_hint(Path(self.root).parent)}") \
                from None
        except Exception as e:
            raise DataError(f"{self.path(file)}: unreadable dataset shard ({type(e).__name__}: {e}); "
                            f"{refetch_hint(Path(self.root).parent)}") from None

    def _index(self) -> list[Group]:
        """The row groups, from the manifest (no file is opened: 9,000 shards in object storage would be 9,000
        requests); a shard whose footer disagrees fails when it is read."""
        groups, start = [], 0
        for shard in self.shards:
            if "row_groups" in shard:
                for g, rows in enumerate(shard["row_groups"]):
                    groups.append(Group(shard["file"], g, start, int(rows)))
                    start += int(rows)
                continue
            meta = self._open(shard["file"]).metadata
            if meta.num_rows != shard["rows"]:
                raise DataError(f"{self.path(shard['file'])}: {meta.num_rows} rows, the manifest says {shard['rows']}; "
                                f"{refetch_hint(Path(self.root).parent)}")
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                groups.append(Group(shard["file"], g, start, rows))
                start += rows
        return groups

    def __len__(self) -> int:
        return sum(s["rows"] for s in self.shards)

    def read_group(self, g: Group) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 [n, C, H, W], labels int64 [n]) of one row group."""
        if self._file is None or self._file[0] != g.file:  # consecutive groups of one shard: one open
            self._file = (g.file, self._open(g.file))
        f = self._file[1]
        if g.index >= f.metadata.num_row_groups or f.metadata.row_group(g.index).num_rows != g.rows:
            raise DataError(f"{self.path(g.file)}: its row groups differ from the manifest's; "
                            f"{refetch_hint(Path(self.root).parent)}")
        t = f.read_row_group(g.index, columns=["image", "label"])
        images = _decode_images(t.column("image"), self.shape)
        labels = t.column("label").to_numpy()
        return images, labels.astype(np.int64, copy=False)

    def iter_groups(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for g in self.groups:
            yield self.read_group(g)

    def _group_of(self, i: int) -> int:
        starts = [g.start for g in self.groups]
        return int(np.searchsorted(starts, i, side="right") - 1)

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self._cache is None or not (self.groups[self._cache[0]].start <= i
                                       < self.groups[self._cache[0]].start + self.groups[self._cache[0]].rows):
            k = self._group_of(i)
            self._cache = (k, *self.read_group(self.groups[k]))
        k, images, _ = self._cache
        return images[i - self.groups[k].start]

    def take(self, indices: Sequence[int]) -> Split:
        """The rows at ``indices`` (any order), reading only the row groups that hold them."""
        idx = np.asarray(indices, dtype=np.int64)
        images = np.empty((len(idx), *self.shape), dtype=np.uint8)
        labels = np.empty(len(idx), dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range 0..{len(self) - 1}")
        where = np.searchsorted([g.start for g in self.groups], idx, side="right") - 1
        for k in np.unique(where):
            g = self.groups[int(k)]
            imgs, labs = self.read_group(g)
            sel = np.nonzero(where == k)[0]
            images[sel] = imgs[idx[sel] - g.start]
            labels[sel] = labs[idx[sel] - g.start]
        return Split(images, labels)

    def head(self, n: int) -> Split:
        return self.take(np.arange(min(n, len(self))))

    def read_all(self) -> Split:
        """The whole split in memory: only for consumers that need it whole and small (the classifier)."""
        return self.take(np.arange(len(self)))


@dataclass(frozen=True)
class ShardedDataset(DatasetMeta):
    meta: dict[str, Any]
    train: SplitReader
    holdout: SplitReader


def is_url(location: os.PathLike | str) -> bool:
    return "://" in str(location)


def _filesystem(url: str):
    from pyarrow import fs

    return fs.FileSystem.from_uri(url)


def open_dataset(folder: os.PathLike | str) -> ShardedDataset:
    """The fetch stage's output in ``folder`` (nothing read but the manifest and the shards' footers). ``folder``
    may be a URL that pyarrow reads (``s3://bucket/dataset``, ``gs://...``, ``file:///...``): shards in object
    storage are read in place, a row group at a time.

    Raises :class:`DataError` for a missing or incomplete folder, and for the old single-file layout (with how to
    re-fetch)."""
    if is_url(folder):
        url = str(folder).rstrip("/")
        try:
            fs, path = _filesystem(f"{url}/dataset.json")
            with fs.open_input_stream(path) as f:
                meta = json.loads(f.read())
        except Exception as e:
            raise DataError(f"{url}/dataset.json: cannot read the dataset manifest ({type(e).__name__}: {e})") \
                from None
        if meta.get("format") != FORMAT:
            raise DataError(f"{url}/dataset.json: dataset format {meta.get('format')!r}, this version reads "
                            f"{FORMAT!r}; re-fetch it")
        shape = tuple(int(s) for s in meta["shape"])
        readers = {s: SplitReader(f"{url}/{s}", shape, list(meta["splits"][s]["shards"])) for s in SPLITS}
        return ShardedDataset(meta, readers["train"], readers["holdout"])
    folder = Path(folder)
    manifest = folder / "dataset.json"
    if not manifest.is_file():
        if any((folder / n).is_file() for n in OLD_LAYOUT):
            raise DataError(f"{folder}: an unfinished dataset in the old single-file layout (train.npz); "
                            f"{refetch_hint(folder)}")
        raise DataError(f"{manifest}: dataset manifest not found; run the fetch stage first")
    meta = read_json(manifest)
    if meta.get("format") != FORMAT:
        if "format" not in meta and any((folder / n).is_file() for n in OLD_LAYOUT):
            raise DataError(f"{folder}: a dataset in the old single-file layout (train.npz), which this version no "
                            f"longer reads; {refetch_hint(folder)}")
        raise DataError(f"{manifest}: dataset format {meta.get('format')!r}, this version reads {FORMAT!r}; "
                        f"{refetch_hint(folder)}")
    shape = tuple(int(s) for s in meta["shape"])
    readers = {s: SplitReader(str(folder / s), shape, list(meta["splits"][s]["shards"])) for s in SPLITS}
    return ShardedDataset(meta, readers["train"], readers["holdout"])


# -- streaming a split to a training worker ---------------------------------------------------------------------------
def epoch_part(n: int, groups: Sequence[Group], seed: int, epoch: int, rank: int, world: int) -> list[tuple[Group, int, int]]:
    """The rank's disjoint part of one epoch: the split's row groups in an order drawn from (seed, epoch), cut into
    ``world`` contiguous ranges of ``n // world`` rows; returns (group, first row, last row + 1) within each group
    (a group on a boundary is shared: each rank reads its own rows of it)."""
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(groups))
    per = n // world
    lo, hi = rank * per, (rank + 1) * per
    out, pos = [], 0
    for k in order:
        g = groups[int(k)]
        a, b = max(lo, pos), min(hi, pos + g.rows)
        if a < b:
            out.append((g, a - pos, b - pos))
        pos += g.rows
        if pos >= hi:
            break
    return out


class TrainStream:
    """What one training worker reads: ``steps_per_epoch`` batches of ``batch`` uint8 images per epoch.

    - Disjoint: each of ``world`` ranks reads its own ``1/world`` of the split in each epoch (:func:`epoch_part`).
    - Shuffled in two levels: the row groups' order is drawn per epoch, and rows are shuffled within windows of
      about ``buffer_rows`` consecutive rows (the whole part, when it fits: then it is a full shuffle).
    - Prefetched: a thread reads and decodes the next window while the model trains (pyarrow releases the GIL).
    - Exact resume: the order is a function of (seed, epoch, rank, world) alone, so :meth:`epoch` with ``skip``
      batches yields what the uninterrupted run would have; windows wholly before the skip point are not read.

    Memory is at most two windows (``buffer_rows`` rows each, plus one row group), whatever the split's size.
    """

    def __init__(self, split: SplitReader, batch: int, rank: int, world: int, seed: int, buffer_rows: int):
        self.split, self.batch, self.rank, self.world, self.seed = split, batch, rank, world, seed
        self.buffer_rows = max(batch, buffer_rows)
        self.n = len(split)
        self.steps_per_epoch = (self.n // world) // batch

    def _windows(self, epoch: int) -> list[list[tuple[Group, int, int]]]:
        part = epoch_part(self.n, self.split.groups, self.seed, epoch, self.rank, self.world)
        windows, cur, rows = [], [], 0
        for piece in part:
            cur.append(piece)
            rows += piece[2] - piece[1]
            if rows >= self.buffer_rows:
                windows.append(cur)
                cur, rows = [], 0
        if cur:
            windows.append(cur)
        return windows

    def _read_window(self, epoch: int, w: int, pieces) -> tuple[np.ndarray, np.ndarray]:
        """A window's rows in group order (one array, filled a row group at a time) and its shuffle order."""
        rows = sum(b - a for _, a, b in pieces)
        images = np.empty((rows, *self.split.shape), dtype=np.uint8)
        at = 0
        for g, a, b in pieces:
            images[at:at + b - a] = self.split.read_group(g)[0][a:b]
            at += b - a
        perm = np.random.default_rng([self.seed, epoch, self.rank, self.world, w]).permutation(rows)
        return images, perm

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[np.ndarray]:
        """The epoch's batches (uint8 [batch, C, H, W]) from batch ``skip`` on.

        The read-ahead thread builds the next window while this one is consumed, and no further: at most two
        windows exist at a time. A batch is gathered from its window by index (no shuffled copy of the window)."""
        windows = self._windows(epoch)
        need = self.steps_per_epoch * self.batch
        skip_rows = skip * self.batch
        starts = np.cumsum([0] + [sum(b - a for _, a, b in w) for w in windows])
        first = int(np.searchsorted(starts, skip_rows, side="right") - 1)
        jobs = [(w, windows[w], int(starts[w])) for w in range(max(first, 0), len(windows)) if starts[w] < need]

        q: queue.Queue = queue.Queue()
        may_build = threading.Semaphore(1)  # released each time the consumer takes a window
        stop = threading.Event()

        def produce():
            try:
                for w, pieces, start in jobs:
                    may_build.acquire()
                    if stop.is_set():
                        return
                    q.put((start, *self._read_window(epoch, w, pieces)))
                q.put(None)
            except BaseException as e:  # handed to the consumer, which raises it
                q.put(e)

        t = threading.Thread(target=produce, name="train-stream", daemon=True)
        t.start()
        carry = np.empty((0, *self.split.shape), dtype=np.uint8)  # rows taken, fewer than a batch, not yet handed out
        next_row = skip_rows  # the epoch position of the next row to take
        try:
            while next_row < need:
                item = q.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                may_build.release()
                start, images, perm = item
                lo, hi = max(0, next_row - start), min(len(perm), need - start)
                order = perm[lo:hi]
                next_row = start + hi
                k = 0
                if len(carry):
                    k = min(self.batch - len(carry), len(order))
                    carry = np.concatenate([carry, images[order[:k]]])
                    if len(carry) == self.batch:
                        yield carry
                        carry = carry[:0]
                while k + self.batch <= len(order):
                    yield images[order[k:k + self.batch]]
                    k += self.batch
                if k < len(order):
                    carry = np.concatenate([carry, images[order[k:]]])
                del images
        finally:
            stop.set()
            may_build.release()  # a producer waiting for its turn sees stop and returns
            t.join(timeout=5)


# -- a split that only the driver's disk holds, through Ray's object store ------------------------------------------
SHIP_FRACTION = 0.5  # at most this share of a node's object store for a shipped split: the rest is Ray's working room


def split_bytes(split: SplitReader) -> int:
    """The size of a split's shard files on disk."""
    return sum(os.path.getsize(split.path(s["file"])) for s in split.shards)


def ship_split(split: SplitReader, object_store_bytes: float) -> SplitReader:
    """The split with each shard file put, as it is on disk (bytes), in Ray's object store: a reader for workers on
    nodes that cannot read the driver's folder. The files keep their row groups, so a worker reads exactly the batches
    it would read from disk. Each node's object store holds the files its workers read (a shard file at a time is
    fetched, then read in place); the driver's holds them all.

    ``object_store_bytes``: the smallest object store among the nodes involved; a split larger than
    :data:`SHIP_FRACTION` of it is refused with one line (put it in object storage or on a shared file system)."""
    import numpy as np
    import ray

    size = split_bytes(split)
    if size > SHIP_FRACTION * object_store_bytes:
        raise DataError(f"{split.root}: the training split ({size / 2**20:.0f} MiB) is only on the driver's disk and "
                        f"would take more than {SHIP_FRACTION:.0%} of a Ray node's object store "
                        f"({object_store_bytes / 2**20:.0f} MiB); pass --data as its URL in object storage "
                        "(s3://…) or keep it on a file system every node mounts at the same path")
    objects = {s["file"]: ray.put(np.fromfile(split.path(s["file"]), dtype=np.uint8)) for s in split.shards}
    return SplitReader(split.root, split.shape, split.shards, list(split.groups), objects=objects)


def load_dataset(folder: os.PathLike | str) -> DatasetArtifact:
    """The dataset in ``folder`` read whole into memory, for the consumers that need it so and are small (the
    classifier); the others stream (:func:`open_dataset`)."""
    ds = open_dataset(folder)
    return DatasetArtifact(ds.train.read_all(), ds.holdout.read_all(), ds.meta)


# -- the same through Ray Data ----------------------------------------------------------------------------------------
def ray_dataset(split: SplitReader):
    """The split as a Ray Data dataset (``read_parquet`` over its shards, pixels only). Its read tasks ask for no
    CPU: the training workers hold the cluster's CPUs, and a read task that waited for one would never run. A
    shipped split (:func:`ship_split`: its files only on the driver's disk) is read here and handed to Ray Data as
    Arrow tables in the object store (``from_arrow``) instead: a read task on another node would not find the files."""
    import ray.data

    ctx = ray.data.DataContext.get_current()  # travels with the dataset to the training workers
    ctx.enable_progress_bars = False  # one bar per operator per worker, refreshed every second: noise in a log
    ctx.print_on_execution_start = False
    if split.objects is not None:
        import pyarrow.parquet as pq

        return ray.data.from_arrow([pq.read_table(split.path(s["file"]), columns=["image"]) for s in split.shards])
    return ray.data.read_parquet([split.path(s["file"]) for s in split.shards], columns=["image"],
                                 ray_remote_args={"num_cpus": 0})


def ray_batch_images(column: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A Ray Data numpy batch's ``image`` column (bytes per row) -> uint8 [n, C, H, W]."""
    if column.dtype.kind == "S":
        flat = np.frombuffer(np.ascontiguousarray(column).tobytes(), dtype=np.uint8)
    else:
        flat = np.frombuffer(b"".join(column), dtype=np.uint8)
    return flat.reshape(len(column), *shape).copy()


def ray_epoch(shard, batch: int, steps: int, shape: Sequence[int], buffer_rows: int, seed: int,
              skip: int = 0) -> Iterator[np.ndarray]:
    """One epoch of a worker's Ray Data shard (``ray.train.get_dataset_shard``): ``steps`` batches, the first
    ``skip`` read and dropped (Ray Data's order is not reproducible, so a resume is approximate: the resumed epoch
    has as many batches left as the uninterrupted one, drawn in a new order). The epoch is read to its end even
    when fewer batches are wanted: Ray's split of an epoch waits for every worker to finish it."""
    it = shard.iter_batches(batch_size=batch, batch_format="numpy", drop_last=True, prefetch_batches=2,
                            local_shuffle_buffer_size=max(batch, buffer_rows), local_shuffle_seed=seed)
    for k, b in enumerate(it):
        if skip <= k < steps:
            yield ray_batch_images(b["image"], shape)
