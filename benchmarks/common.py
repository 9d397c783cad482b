"""Shared pieces of the benchmarks: the diffusers twin of our UNet, A/B/A/B timing, machine facts, results files.

The machine these run on is shared and noisy, so no absolute time is trusted alone: every comparison runs both
sides alternately in one process (A, B, A, B, ...) and reports the median of the per-pair ratios.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# The configurations measured: the paper's CIFAR-10 network (35,746,307 parameters) and the `digits` preset's.
CIFAR10 = dict(image_channels=3, image_size=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
               attn_resolutions=(16,), dropout=0.1, num_groups=32)


def digits_unet_kwargs() -> dict[str, Any]:
    """The UNet of params.yaml (the `digits` preset), read from the file so the benchmark follows the preset."""
    from tasks.lib.config import load_config

    return load_config(REPO / "params.yaml").unet_config().to_dict()


def diffusers_unet(image_channels, image_size, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, num_groups):
    """A ``diffusers.UNet2DModel`` with the paper's structure (google/ddpm-cifar10-32's layout, generalised).

    Same blocks as ``ddpm.unet.UNet``: per level ``num_res_blocks`` ResNet blocks (+1 on the way up, each eating
    one skip), single-head attention at ``attn_resolutions`` and in the middle, 3x3 stride-2 down-sampling
    convs, nearest x2 + conv up-sampling, time MLP ch -> 4ch -> 4ch. The parameter counts are equal.
    """
    from diffusers import UNet2DModel

    res = [image_size // 2**i for i in range(len(ch_mult))]
    down = tuple("AttnDownBlock2D" if r in attn_resolutions else "DownBlock2D" for r in res)
    up = tuple("AttnUpBlock2D" if r in attn_resolutions else "UpBlock2D" for r in reversed(res))
    return UNet2DModel(
        sample_size=image_size, in_channels=image_channels, out_channels=image_channels,
        block_out_channels=tuple(ch * m for m in ch_mult), down_block_types=down, up_block_types=up,
        layers_per_block=num_res_blocks, norm_num_groups=num_groups, dropout=dropout,
        attention_head_dim=None,  # one head over all channels, as in the paper
        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, add_attention=True,
    )


def interleave(sides: dict[str, Callable[[], float]], pairs: int, warmup: int = 1) -> dict[str, Any]:
    """Run each side's ``fn`` (which returns a throughput, higher is better) alternately ``pairs`` times.

    The order inside a pair alternates too (A B, B A, ...) so neither side always follows the other. Returns
    every measurement, each side's median, and the median over pairs of ``first side / other side``.
    """
    names = list(sides)
    for _ in range(warmup):
        for n in names:
            sides[n]()
    got: dict[str, list[float]] = {n: [] for n in names}
    for i in range(pairs):
        for n in (names if i % 2 == 0 else list(reversed(names))):
            got[n].append(sides[n]())
    out: dict[str, Any] = {"pairs": pairs, "values": got, "median": {n: statistics.median(v) for n, v in got.items()}}
    base = names[0]
    out["ratios"] = {n: statistics.median([a / b for a, b in zip(got[base], got[n])]) for n in names[1:]}
    return out


def throughput(fn: Callable[[], Any], images: int, reps: int = 1) -> Callable[[], float]:
    """Wrap ``fn`` (one unit of work on ``images`` images) into a callable returning images/s over ``reps`` calls."""

    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return images * reps / (time.perf_counter() - t0)

    return run


def cpu_model() -> str:
    """The CPU's model name (``model name`` in /proc/cpuinfo on Linux; platform's answer elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine() -> dict[str, Any]:
    """What every results file records about where it ran. diffusers' version is read from the installed package's
    metadata, without importing it, and is None where it is not installed: benchmarks that do not compare with
    diffusers (the demo, inpainting, the report's tests) must not need it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    try:
        diffusers_version = version("diffusers")
    except PackageNotFoundError:
        diffusers_version = None
    return {
        "cpu": cpu_model(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in load] if load else None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": diffusers_version,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def write_result(name: str, result: dict[str, Any], command: str, results_dir: Path | None = None) -> Path:
    """benchmarks/results/<name>.json (or ``results_dir``/<name>.json) with the command and the machine
    (atomically)."""
    from ddpm.checkpoint import atomic_write_bytes

    folder = Path(results_dir) if results_dir is not None else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    blob = {"benchmark": name, "command": command, "machine": machine(), **result}
    atomic_write_bytes(path, lambda f: f.write(json.dumps(blob, indent=2).encode() + b"\n"))
    print(f"wrote {path}")
    return path


def set_threads(n: int | None) -> int:
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()
