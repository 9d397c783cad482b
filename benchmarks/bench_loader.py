"""The dataset format, measured: images/s ONE loader worker delivers to a consumer that does no work, per format.

One worker is one process: one ``tasks.lib.shards.TrainStream`` (with its prefetch thread) feeding this process's
loop, torch pinned to 1 thread. The consumer only counts the batch and touches one pixel, so what is measured is
the loader alone; the CPU time of the whole process (consumer, prefetch thread, pyarrow's threads) per image says
how many cores (= loader workers, one process each) it takes to feed a GPU at a given rate: CPU seconds per 1,000
images is cores per 1,000 images/s.

Formats, over the same generated images and read in the same order (the first batches are checked equal):

- ``parquet``: ours. Shards written by ``SplitWriter`` (uncompressed fixed-size-binary pixels, the product's shard
  and row-group sizes), read by ``TrainStream`` with the product's window (``train.shuffle_buffer_mb``).
  ``parquet+torch`` is the same with each batch made a torch uint8 tensor (``torch.from_numpy``), as training does.
- ``parquet-zstd``: the same layout written with pyarrow's zstd (``--zstd-level``), the same reader.
- ``npy-mmap``: ``.npy`` shards of the same rows, opened with ``np.load(mmap_mode='r')``; the same windows and
  permutations as ``TrainStream`` (its window reader replaced), each window gathered by one fancy index per shard.
- ``parquet-png``: a binary column of PNG files (PIL, ``--png-level`` 6, its default) in the same layout, decoded
  per image with PIL into [C, H, W]: what an image-file format (WebDataset, folders of PNGs) costs per image.
- ``ray-data`` (``--no-ray`` skips it): ``ray.data.read_parquet(<our shards>).iter_torch_batches(...)`` in a local
  Ray started with ``ray.init(num_cpus=1)`` after the others have run, batches collated from Arrow to torch uint8,
  rows in file order (``--ray-shuffle-rows`` sets a local shuffle buffer). Ray Data starts an execution per epoch:
  its start-up is the median wall of an epoch over a shard of one batch (measured alternately with the real
  epochs), reported beside the rate without it. Its CPU time is that of this process and every process below it
  (the local Ray cluster: GCS, raylet, agents, workers, idle ones included), sampled at 10 Hz.

Data: seeded, deterministic smooth random images: a 1/f-like sum of octaves of Gaussian noise (2x2 up to half the
side, bilinearly upsampled, amplitude halving per octave) plus per-pixel Gaussian noise (``--noise``, 4 levels), so
lossless codecs find about what they find in photos (PNG 0.57-0.64 of raw, zstd 0.83-0.90), not the ~0 of flat
images or the 1.0 of white noise. Files are read from the page cache: every file is read once before its first
epoch, and one warm-up epoch per format is not counted. Formats alternate epoch by epoch (the order reversed every
round); each figure is the median over ``--epochs`` epochs.

    python -m benchmarks.bench_loader             # full run: ~3 min on 2 idle cores (~1 min of it PNG encoding)
    python -m benchmarks.bench_loader --quick     # ~30 s smoke run: small data, 2 epochs
    python -m benchmarks.bench_loader --no-ray    # without the Ray Data rows

Writes benchmarks/results/loader.json.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from benchmarks.common import REPO, cpu_model, write_result

# The H200 training rate of BENCHMARKS.md ("GPU: one NVIDIA H200"): 5,487 images/s, compiled, bf16, batch 4,096, the
# paper's 35.7M CIFAR-10 UNet at 32x32.
GPU_RATE_32 = 5500.0
FULL = {"n32": 20_000, "n256": 1_500, "epochs": 4, "warmup": 1}
QUICK = {"n32": 3_000, "n256": 120, "epochs": 2, "warmup": 1}

warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


# -- data ---------------------------------------------------------------------------------------------------------------
def smooth_images(n: int, size: int, seed: int, noise: float, chunk: int = 32) -> np.ndarray:
    """uint8 [n, 3, size, size]: octaves of Gaussian noise from 2x2 to size/2 (amplitude halving per octave),
    bilinearly upsampled and summed, scaled to std ~34 around 128, plus per-pixel Gaussian noise of ``noise``
    levels. Deterministic in ``seed``."""
    F = torch.nn.functional
    out = np.empty((n, 3, size, size), np.uint8)
    rng = np.random.default_rng(seed)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        g, amp = 2, 1.0
        acc = torch.from_numpy(rng.standard_normal((m, 3, g, g), dtype=np.float32))
        while g < size:
            g, amp = g * 2, amp * 0.5
            acc = F.interpolate(acc, size=(g, g), mode="bilinear", align_corners=False)
            if g <= size // 2:
                acc += amp * torch.from_numpy(rng.standard_normal((m, 3, g, g), dtype=np.float32))
        acc = acc * 40 + 128 + noise * torch.from_numpy(rng.standard_normal((m, 3, size, size), dtype=np.float32))
        out[s:s + m] = acc.clamp_(0, 255).round_().to(torch.uint8).numpy()
    return out


def png_bytes(image_chw: np.ndarray, level: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image_chw.transpose(1, 2, 0))).save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def write_parquet_like(folder: Path, images: np.ndarray, shard_images: int, row_group: int, compression: str,
                       level: Optional[int] = None, png_level: Optional[int] = None) -> list[dict[str, Any]]:
    """The product's layout (same rows per shard and per row group, columns ``image`` and ``label``), with
    ``compression``; with ``png_level`` the ``image`` column holds one PNG file per row (binary)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    image_bytes = int(np.prod(images.shape[1:]))
    for k, start in enumerate(range(0, len(images), shard_images)):
        part = np.ascontiguousarray(images[start:start + shard_images])
        n = len(part)
        if png_level is None:
            col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(image_bytes), n, [None, pa.py_buffer(part)])
        else:
            col = pa.array([png_bytes(im, png_level) for im in part], type=pa.binary())
        table = pa.table({"image": col, "label": pa.array(np.full(n, -1, np.int64))})
        name = f"part-{k:05d}.parquet"
        pq.write_table(table, folder / name, row_group_size=row_group, compression=compression,
                       compression_level=level, write_statistics=False)
        shards.append({"file": name, "rows": n})
    return shards


def write_npy(folder: Path, images: np.ndarray, shard_images: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for k, start in enumerate(range(0, len(images), shard_images)):
        names.append(f"part-{k:05d}.npy")
        np.save(folder / names[-1], np.ascontiguousarray(images[start:start + shard_images]))
    return names


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in files_of(folder))


def warm_page_cache(folder: Path) -> None:
    for p in files_of(folder):
        with open(p, "rb") as f:
            while f.read(16 << 20):
                pass


# -- readers ------------------------------------------------------------------------------------------------------------
def png_reader_class():
    from tasks.lib.shards import Group, SplitReader

    class PngSplitReader(SplitReader):
        """A SplitReader whose ``image`` column holds PNG files: one PIL decode per row, into [C, H, W]."""

        def read_group(self, g: Group) -> tuple[np.ndarray, np.ndarray]:
            from PIL import Image

            t = self._open(g.file).read_row_group(g.index, columns=["image", "label"])
            blobs = t.column("image").to_pylist()
            images = np.empty((len(blobs), *self.shape), np.uint8)
            for i, b in enumerate(blobs):
                images[i] = np.asarray(Image.open(io.BytesIO(b))).transpose(2, 0, 1)
            return images, t.column("label").to_numpy().astype(np.int64, copy=False)

    return PngSplitReader


class NpySplit:
    """``.npy`` shards memory-mapped, with the Parquet split's row groups as the unit of the epoch's order (so that
    a ``TrainStream`` over it draws the very same windows and permutations)."""

    def __init__(self, folder: Path, names: list[str], shape: tuple[int, int, int], shard_images: int, groups):
        self.maps = [np.load(folder / n, mmap_mode="r") for n in names]
        self.shape, self.shard_images, self.groups = shape, shard_images, groups
        self.n = sum(len(m) for m in self.maps)

    def __len__(self) -> int:
        return self.n


def npy_stream_class():
    from tasks.lib.shards import TrainStream

    class NpyStream(TrainStream):
        """TrainStream with its window reader replaced: the window's rows, permuted, gathered from the maps by one
        fancy index per shard (a faithful simple mmap reader: pick a window, fancy-index)."""

        def _read_window(self, epoch: int, w: int, pieces) -> tuple[np.ndarray, np.ndarray]:
            images = self._gather(epoch, w, pieces)
            return images, np.arange(len(images))  # gathered in shuffled order already

        def _gather(self, epoch: int, w: int, pieces) -> np.ndarray:
            sp: NpySplit = self.split  # type: ignore[assignment]
            idx = np.concatenate([np.arange(g.start + a, g.start + b) for g, a, b in pieces])
            perm = np.random.default_rng([self.seed, epoch, self.rank, self.world, w]).permutation(len(idx))
            idx = idx[perm]
            shard = idx // sp.shard_images
            first, last = int(shard.min()), int(shard.max())
            if first == last:
                return sp.maps[first][idx - first * sp.shard_images]
            out = np.empty((len(idx), *sp.shape), np.uint8)
            for s in range(first, last + 1):
                sel = np.nonzero(shard == s)[0]
                if len(sel):
                    out[sel] = sp.maps[s][idx[sel] - s * sp.shard_images]
            return out

    return NpyStream


# -- measuring ----------------------------------------------------------------------------------------------------------
class TreeCPU:
    """CPU seconds (user + system) used by this process and every process below it (the local Ray cluster: GCS,
    raylet, agents, workers), as a monotonic counter. Ray starts and ends worker processes within an epoch, so the
    tree is sampled every ``period`` s by a thread and a process that ended keeps the CPU it had when last seen (a
    process loses at most its last ``period``); the sampler's own CPU is left out."""

    def __init__(self, period: float = 0.1):
        import psutil

        self.me = psutil.Process()
        self.seen: dict[tuple[int, float], float] = {}
        self.own = 0.0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, args=(period,), name="tree-cpu", daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        import psutil

        t0 = time.thread_time()
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    self.seen[(p.pid, p.create_time())] = t.user + t.system
            except psutil.Error:
                pass
        self.own += time.thread_time() - t0

    def _loop(self, period: float) -> None:
        while not self.stop.wait(period):
            with self.lock:
                self._sample()

    def __call__(self) -> float:
        with self.lock:
            self._sample()
            return sum(self.seen.values()) - self.own

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def consume(batches: Iterable, to_torch: bool, cpu: Callable[[], float]) -> dict[str, float]:
    """Drain one epoch: count the images and touch one pixel of each batch; wall, time to the first batch, CPU."""
    n = nb = 0
    first = None
    c0, t0 = cpu(), time.perf_counter()
    for b in batches:
        if to_torch and isinstance(b, np.ndarray):
            b = torch.from_numpy(b)
        int(b[-1, -1, -1, -1])  # touch one pixel
        n += len(b)
        nb += 1
        if first is None:
            first = time.perf_counter() - t0
    wall = time.perf_counter() - t0
    return {"images": n, "batches": nb, "wall_s": wall, "first_batch_s": first or wall, "cpu_s": cpu() - c0}


def summarise(epochs: list[dict[str, float]]) -> dict[str, Any]:
    med = statistics.median
    return {
        "images_per_epoch": epochs[0]["images"],
        "images_per_s": round(med(e["images"] / e["wall_s"] for e in epochs), 1),
        "first_batch_s": round(med(e["first_batch_s"] for e in epochs), 4),
        "cpu_s_per_1k_images": round(med(1000 * e["cpu_s"] / e["images"] for e in epochs), 5),
        "cpu_per_wall": round(med(e["cpu_s"] / e["wall_s"] for e in epochs), 3),
        "epochs": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in e.items()} for e in epochs],
    }


class Ray:
    """A local Ray of one CPU, started once, for the ``ray-data`` rows."""

    def __init__(self, object_store_mb: int):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import logging

        import ray

        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False,
                 object_store_memory=object_store_mb << 20, _node_ip_address="127.0.0.1")
        self.init_s = time.perf_counter() - t0
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        self.ray = ray

    def epochs(self, files: list[Path], shape: tuple[int, ...], batch: int, shuffle_rows: int):
        from ray.data.collate_fn import ArrowBatchCollateFn

        from tasks.lib.shards import _decode_images

        class ToTorch(ArrowBatchCollateFn):
            def __call__(self, table):
                return torch.from_numpy(np.ascontiguousarray(_decode_images(table.column("image"), shape)))

        ds = self.ray.data.read_parquet([str(f) for f in files])

        def epoch(e: int) -> Iterator:
            return iter(ds.iter_torch_batches(batch_size=batch, drop_last=True, collate_fn=ToTorch(),
                                              prefetch_batches=1, local_shuffle_buffer_size=shuffle_rows or None,
                                              local_shuffle_seed=e if shuffle_rows else None))

        return epoch

    def close(self) -> None:
        self.ray.shutdown()


def run_rounds(sides: dict[str, tuple[Callable[[int], Iterable], bool, Callable[[], float]]], epochs: int,
               warmup: int, batch: int, log) -> tuple[dict[str, list], dict[str, np.ndarray]]:
    """Warm-up epochs, then ``epochs`` rounds; in each round every side drains the same epoch number (the same
    order of rows), the sides' order reversed every round. Returns the measured epochs and each side's first batch
    of epoch 0."""
    got: dict[str, list] = {n: [] for n in sides}
    first: dict[str, np.ndarray] = {}
    names = list(sides)
    for e in range(warmup):
        for n in names:
            make, to_torch, cpu = sides[n]
            it = iter(make(e))
            b = next(it)
            if e == 0:
                first[n] = np.array(b.numpy() if isinstance(b, torch.Tensor) else b)
            consume(it, to_torch, cpu)
            it = None
    for r in range(epochs):
        for n in (names if r % 2 == 0 else names[::-1]):
            make, to_torch, cpu = sides[n]
            got[n].append(consume(make(warmup + r), to_torch, cpu))
            e = got[n][-1]
            log(f"    epoch {warmup + r} {n:14s} {e['images'] / e['wall_s']:10,.0f} img/s  first batch "
                f"{e['first_batch_s']:.3f} s  cpu {1000 * e['cpu_s'] / e['images']:.3f} s/1k")
    return got, first


def bench_size(size: int, n: int, batch: int, args, work: Path, log) -> dict[str, Any]:
    """Generate the images, write every format, measure the in-process readers; leaves ``parquet/`` (and, for
    Ray's start-up, ``one-batch/``: a shard of one batch) in the size's folder."""
    from tasks.lib.shards import SplitReader, SplitWriter, TrainStream

    shape = (3, size, size)
    image_bytes = int(np.prod(shape))
    d = work / f"{size}"
    log(f"[{size}x{size}] generating {n:,} images ({n * image_bytes / 1e6:.0f} MB) ...")
    t0 = time.perf_counter()
    images = smooth_images(n, size, seed=size, noise=args.noise)
    gen_s = time.perf_counter() - t0

    formats: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    w = SplitWriter(d / "parquet", shape)
    w.add(images, np.full(n, -1, np.int64))
    entry = w.close()
    formats["parquet"] = {"write_s": time.perf_counter() - t0}
    shard_images, row_group = w.shard_images, w.row_group
    t0 = time.perf_counter()
    zstd_shards = write_parquet_like(d / "parquet-zstd", images, shard_images, row_group, "zstd", args.zstd_level)
    formats["parquet-zstd"] = {"write_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    npy_names = write_npy(d / "npy", images, shard_images)
    formats["npy-mmap"] = {"write_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    png_shards = write_parquet_like(d / "parquet-png", images, shard_images, row_group, "none",
                                    png_level=args.png_level)
    formats["parquet-png"] = {"write_s": time.perf_counter() - t0}
    if args.ray:
        w1 = SplitWriter(d / "one-batch", shape)
        w1.add(images[:batch], np.full(batch, -1, np.int64))
        w1.close()
    del images
    for name, folder in (("parquet", "parquet"), ("parquet-zstd", "parquet-zstd"), ("npy-mmap", "npy"),
                         ("parquet-png", "parquet-png")):
        f = formats[name]
        f["bytes_on_disk"] = disk_bytes(d / folder)
        f["files"] = len(files_of(d / folder))
        f["bytes_per_image"] = round(f["bytes_on_disk"] / n, 1)
        f["of_raw_pixels"] = round(f["bytes_on_disk"] / (n * image_bytes), 4)
        f["write_s"] = round(f["write_s"], 2)
        warm_page_cache(d / folder)
    log(f"[{size}x{size}] generated in {gen_s:.1f} s; written: " + ", ".join(
        f"{k} {v['bytes_on_disk'] / 1e6:.1f} MB ({v['of_raw_pixels']:.2f} of raw) in {v['write_s']} s"
        for k, v in formats.items()))

    buffer_rows = (args.shuffle_buffer_mb << 20) // image_bytes
    split = SplitReader(str(d / "parquet"), shape, entry["shards"])
    zsplit = SplitReader(str(d / "parquet-zstd"), shape, zstd_shards)
    psplit = png_reader_class()(str(d / "parquet-png"), shape, png_shards)
    nsplit = NpySplit(d / "npy", npy_names, shape, shard_images, split.groups)

    def stream(sp, cls=TrainStream):
        s = cls(sp, batch, 0, 1, 0, buffer_rows)
        return s.epoch

    proc = time.process_time
    sides = {
        "parquet": (stream(split), False, proc),
        "parquet+torch": (stream(split), True, proc),
        "npy-mmap": (stream(nsplit, npy_stream_class()), False, proc),
        "parquet-zstd": (stream(zsplit), False, proc),
        "parquet-png": (stream(psplit), False, proc),
    }
    log(f"[{size}x{size}] batch {batch}, window {min(buffer_rows, n):,} rows ({args.shuffle_buffer_mb} MiB), "
        f"{len(split.groups)} row groups of {row_group} rows, {entry['shards'].__len__()} shard(s); "
        f"{args.warmup} warm-up + {args.epochs} measured epochs per format")
    got, first = run_rounds(sides, args.epochs, args.warmup, batch, log)
    same = {k: bool(np.array_equal(v, first["parquet"])) for k, v in first.items() if k != "parquet"}
    if not all(same.values()):
        raise SystemExit(f"error: [{size}] the formats' first batches differ from parquet's: {same}")
    results = {k: {**formats.get(k.split("+")[0], {}), **summarise(v)} for k, v in got.items()}

    for folder in ("parquet-zstd", "npy", "parquet-png"):
        shutil.rmtree(d / folder, ignore_errors=True)
    return {"shape": list(shape), "images": n, "batch": batch, "raw_pixel_bytes": n * image_bytes,
            "shard_images": shard_images, "row_group_rows": row_group, "shards": len(entry["shards"]),
            "window_rows": min(buffer_rows, n), "generate_s": round(gen_s, 1), "first_batch_equal": same,
            "formats": results}


def bench_ray(sz: dict[str, Any], args, work: Path, ray: Ray, cpu: TreeCPU, log) -> None:
    """The ``ray-data`` row of one size (into ``sz``), from the ``parquet`` shards ``bench_size`` left; its
    per-epoch start-up is the median wall of an epoch over a shard of one batch (``one-batch``), measured alternately
    with the real epochs."""
    shape, batch, size = tuple(sz["shape"]), sz["batch"], sz["shape"][1]
    d = work / f"{size}"
    warm_page_cache(d / "parquet")
    sides = {"ray-data": (ray.epochs(files_of(d / "parquet"), shape, batch, args.ray_shuffle_rows), True, cpu),
             "ray-one-batch": (ray.epochs(files_of(d / "one-batch"), shape, batch, 0), True, cpu)}
    log(f"[{size}x{size}] Ray Data, batch {batch}: {args.warmup} warm-up + {args.epochs} measured epochs, each "
        f"beside an epoch of one batch")
    got, _ = run_rounds(sides, args.epochs, args.warmup, batch, log)
    startup = statistics.median(e["wall_s"] for e in got["ray-one-batch"])
    rest = [e["images"] / (e["wall_s"] - startup) for e in got["ray-data"] if e["wall_s"] > startup]
    sz["formats"]["ray-data"] = {
        **{k: v for k, v in sz["formats"]["parquet"].items() if k in ("bytes_on_disk", "files", "bytes_per_image",
                                                                       "of_raw_pixels", "write_s")},
        **summarise(got["ray-data"]),
        "epoch_startup_s": round(startup, 3),
        "images_per_s_excluding_startup": round(statistics.median(rest), 1) if rest else None,
        "one_batch_epochs": summarise(got["ray-one-batch"])["epochs"],
        "cpu_counts": "this process and every process below it (the local Ray cluster, idle parts included)",
        "shuffle_rows": args.ray_shuffle_rows or None}


def cores_needed(sz: dict[str, Any], target: float) -> dict[str, Any]:
    """For each format: cores by CPU time (target x CPU s per image) and workers by rate (target / one worker's
    images/s), at ``target`` images/s."""
    out = {"target_images_per_s": round(target, 1), "formats": {}}
    for k, f in sz["formats"].items():
        by_cpu = target * f["cpu_s_per_1k_images"] / 1000
        by_rate = target / f["images_per_s"]
        out["formats"][k] = {"cores_per_1000_images_per_s": f["cpu_s_per_1k_images"],
                             "cores_by_cpu_time": round(by_cpu, 3), "workers_by_rate": round(by_rate, 3),
                             "workers_needed": max(1, math.ceil(max(by_cpu, by_rate)))}
        if f.get("images_per_s_excluding_startup"):
            out["formats"][k]["workers_by_rate_excluding_startup"] = round(
                target / f["images_per_s_excluding_startup"], 3)
    return out


def git_facts() -> dict[str, Any]:
    """The commit, and which of the files that decide these numbers differ from it (status letters, as git's)."""

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    status = git("status", "--porcelain", "--", "tasks/lib/shards.py", "benchmarks/bench_loader.py")
    return {"commit": git("rev-parse", "HEAD").strip() or None,
            "uncommitted": [line.strip() for line in status.splitlines() if line.strip()]}


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return cpu_model()


def versions() -> dict[str, Optional[str]]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("numpy", "pyarrow", "pillow", "ray", "torch"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def main(argv=None) -> dict:
    from tasks.lib.config import TrainConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK} (~30 s)")
    p.add_argument("--n32", type=int, help=f"images at 32x32 (default {FULL['n32']:,})")
    p.add_argument("--n256", type=int, help=f"images at 256x256 (default {FULL['n256']:,}); 0 skips the size")
    p.add_argument("--batch32", type=int, default=128)
    p.add_argument("--batch256", type=int, default=32)
    p.add_argument("--epochs", type=int, help=f"measured epochs per format (default {FULL['epochs']})")
    p.add_argument("--warmup", type=int, help="warm-up epochs per format, not counted (default 1)")
    p.add_argument("--shuffle-buffer-mb", type=int, default=TrainConfig().shuffle_buffer_mb,
                   help="TrainStream's window (train.shuffle_buffer_mb; default: the product's)")
    p.add_argument("--noise", type=float, default=4.0, help="per-pixel Gaussian noise of the images, in levels")
    p.add_argument("--zstd-level", type=int, default=1, help="parquet-zstd's level (1: pyarrow's default)")
    p.add_argument("--png-level", type=int, default=6, help="PNG compress_level (6: PIL's default)")
    p.add_argument("--ray", action=argparse.BooleanOptionalAction, default=True, help="measure Ray Data too")
    p.add_argument("--ray-shuffle-rows", type=int, default=0,
                   help="Ray Data's local_shuffle_buffer_size (0: none, rows in file order)")
    p.add_argument("--ray-object-store-mb", type=int, default=1024)
    p.add_argument("--gpu-rate", type=float, default=GPU_RATE_32,
                   help="images/s the GPU trains at 32x32 (default: the H200 rate of BENCHMARKS.md)")
    p.add_argument("--gpu-rate-256", type=float, default=None,
                   help="images/s at 256x256 (default: --gpu-rate x 32²/256², i.e. compute per image ~ pixels)")
    p.add_argument("--work", default=None, help="folder for the generated files (default: a temporary one)")
    p.add_argument("--results-dir", default=None, help="where loader.json goes (default benchmarks/results)")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for k in ("n32", "n256", "epochs", "warmup"):
        if getattr(args, k) is None:
            setattr(args, k, preset[k])
    torch.set_num_threads(1)
    import pyarrow as pa

    def log(msg: str) -> None:
        print(msg, flush=True)

    start = time.perf_counter()
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench_loader_", dir=args.work))
    sizes, ray, ray_init_s = [], None, None
    try:
        for size, n, batch in ((32, args.n32, args.batch32), (256, args.n256, args.batch256)):
            if n:
                sizes.append(bench_size(size, n, batch, args, work, log))
        if args.ray and sizes:  # after the others: the Ray cluster's processes would run beside them
            cpu = TreeCPU()
            ray = Ray(args.ray_object_store_mb)
            ray_init_s = ray.init_s
            log(f"[ray] local Ray with 1 CPU started in {ray.init_s:.1f} s")
            try:
                for sz in sizes:
                    bench_ray(sz, args, work, ray, cpu, log)
            finally:
                cpu.close()
    finally:
        if ray is not None:
            ray.close()
        shutil.rmtree(work, ignore_errors=True)

    rate256 = args.gpu_rate_256 or args.gpu_rate * (32 * 32) / (256 * 256)
    cores = {}
    for sz in sizes:
        target = args.gpu_rate if sz["shape"][1] == 32 else rate256
        cores[f"{sz['shape'][1]}x{sz['shape'][2]}"] = cores_needed(sz, target)
    result = {
        "quick": args.quick,
        "what": "images/s one loader worker (one process: TrainStream + its prefetch thread, torch 1 thread) "
                "delivers to a consumer that only counts and touches each batch; median over epochs, page cache warm",
        "data": f"smooth random images (1/f-like octaves of Gaussian noise, bilinear, std ~34 around 128) + Gaussian "
                f"pixel noise sigma {args.noise:g}; seeded, deterministic",
        "settings": {"epochs": args.epochs, "warmup_epochs": args.warmup, "shuffle_buffer_mb": args.shuffle_buffer_mb,
                     "zstd_level": args.zstd_level, "png_level": args.png_level, "torch_threads":
                     torch.get_num_threads(), "pyarrow_cpu_count": pa.cpu_count(),
                     "pyarrow_io_threads": pa.io_thread_count(), "ray_shuffle_rows": args.ray_shuffle_rows or None},
        "cpu_model_name": lscpu_model(),
        "git": git_facts(),
        "versions": versions(),
        "load_average_before": [round(x, 2) for x in load_before],
        "ray_init_s": round(ray_init_s, 2) if ray_init_s is not None else None,
        "sizes": sizes,
        "cores_needed": {
            "gpu_rate_32": args.gpu_rate, "gpu_rate_256": round(rate256, 1),
            "gpu_rate_256_basis": "given" if args.gpu_rate_256 else
            "illustrative: the 32x32 rate x (32*32)/(256*256), i.e. GPU compute per image proportional to pixels",
            "note": "cores_by_cpu_time = rate x CPU s per image (one worker process uses cpu_per_wall cores); "
                    "workers_by_rate = rate / one worker's images/s; CPU s per 1k images = cores per 1,000 images/s",
            **cores},
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print_summary(result, log)
    command = "python -m benchmarks.bench_loader " + " ".join(sys.argv[1:] if argv is None else argv)
    write_result("loader", result, command.strip(), args.results_dir)
    return result


def print_summary(result: dict, log) -> None:
    for sz in result["sizes"]:
        key = f"{sz['shape'][1]}x{sz['shape'][2]}"
        c = result["cores_needed"][key]
        log(f"\n{key}, {sz['images']:,} images, batch {sz['batch']}; cores to feed "
            f"{c['target_images_per_s']:,.0f} img/s")
        log(f"  {'format':14s} {'img/s':>10s} {'1st batch':>9s} {'cpu s/1k':>9s} {'cpu/wall':>8s} "
            f"{'MB on disk':>10s} {'cores(cpu)':>10s} {'workers(rate)':>13s}")
        for k, f in sz["formats"].items():
            cc = c["formats"][k]
            log(f"  {k:14s} {f['images_per_s']:10,.0f} {f['first_batch_s']:9.3f} "
                f"{f['cpu_s_per_1k_images']:9.4f} {f['cpu_per_wall']:8.2f} {f['bytes_on_disk'] / 1e6:10.1f} "
                f"{cc['cores_by_cpu_time']:10.3f} {cc['workers_by_rate']:13.3f}")
            if "epoch_startup_s" in f:
                rest = f["images_per_s_excluding_startup"]
                log(f"  {'':14s} Ray Data: {f['epoch_startup_s']:.2f} s start-up per epoch (an epoch of one batch); "
                    + (f"{rest:,.0f} img/s without it" if rest else "no epoch outlasted it: no rate without it"))
    log(f"\ntotal {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
