"""Shared test fixtures: offline environment, small thread counts, tiny configs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("DVC_NO_ANALYTICS", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Every process the tests start (stages, Ray's workers, servers) inherits this. An OpenMP thread that finishes its
# share of an op spins for the next one by default, a core's worth of CPU taken from the other tests. The tiny
# networks' ops are short and Python runs between them, so the second thread of a Ray Train worker spins most of
# the time. Passive threads sleep and compute the same numbers. The train stage of the tiny config, alone on 2 Intel
# Xeon cores: 24.0 -> 21.2 CPU-s; with two busy loops beside it: 52.9 -> 41.6 CPU-s. Read when libgomp loads, so
# before torch is imported below.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from tasks.lib.config import Config, load_config  # noqa: E402
from ddpm.unet import UNet  # noqa: E402
from process_leaks import pytest_sessionfinish  # noqa: E402,F401  (the hook: no process outlives the session)
from xdist_groups import SHARED_FIXTURES, pytest_collection_modifyitems, pytest_itemcollected  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[1]

# Tiny networks gain nothing from intra-op threads, and two spinning OpenMP threads on a busy 2-core machine can
# slow each op a hundredfold. Stages that want more threads (Ray workers, samplers) set their own.
torch.set_num_threads(1)

# The README's "Reproducibility" contract. Bitwise equality holds for the same computation (same seeds in the same
# batch composition, same torch build and thread count) on one machine; other batch splits (and other CPUs) only
# agree within round-off, because oneDNN picks kernels per batch size, thread count and CPU. Measured on an AMD EPYC
# with AVX-512: <= 2.0e-5 max abs difference in the model's [-1, 1] range (trained digits UNet, DDIM-100, batch 90
# vs 8; < 1e-6 for the tests' short chains of the tiny UNet).
ACROSS_BATCHES_ATOL = 1e-4  # floats in [-1, 1]: 5x the worst measured, far below a wrong seed or row (~0.1-1)
ACROSS_BATCHES_UINT8_LEVELS = 1  # the sample stage's uint8 images: at most 1 level apart ...
ACROSS_BATCHES_UINT8_FRACTION = 0.01  # ... in at most 1% of the pixels (measured: 1 pixel in 23,040)


@pytest.fixture
def repo_root() -> Path:
    return REPO


GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.invalid"}


def clone_project(dest: Path, params: dict | None = None, repo: Path = REPO) -> Path:
    """A fresh project at ``dest``: this working tree's files (tracked and not ignored, without tests/, benchmarks/
    and the run outputs under metrics/), committed to a new git repository, with ``params`` (if given) as its
    committed params.yaml. What a user has after ``git clone``, uncommitted edits of the working tree included."""
    import shutil
    import subprocess

    import yaml

    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            capture_output=True, text=True, check=True).stdout.split()
    for f in listed:
        if (repo / f).is_file() and not f.startswith(("tests/", "benchmarks/", "metrics/")):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / f, dest / f)
    if params is not None:
        (dest / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, **GIT_ENV}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "init"]):
        subprocess.run(["git", *args], cwd=dest, check=True, env=env)
    return dest


# Small enough that a train/sample stage runs in seconds on 2 CPU cores.
TINY = {
    "data": {"dataset": "digits", "holdout_fraction": 0.2},
    "model": {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4], "dropout": 0.0,
              "num_groups": 8},
    "diffusion": {"timesteps": 100, "schedule": "linear"},
    "train": {"steps": 6, "batch_size": 16, "lr": 1e-3, "checkpoint_every": 3, "log_every": 1, "num_workers": 1,
              "use_gpu": False, "ema_decay": 0.9, "warmup_steps": 0, "lr_schedule": "constant"},
    "sample": {"num_samples": 24, "shard_size": 8, "batch_size": 8, "sampler": "ddim", "steps": 5,
               "num_workers": 1, "use_gpu": False, "grid_size": 16},
    "classifier": {"steps": 150},
    # dvc.yaml's sample stage tracks evaluate.repeats, train_classifier evaluate.feature_extractor
    "evaluate": {"kid_subset_size": 10, "repeats": 1, "feature_extractor": "auto"},
    "ray": {"num_cpus": 2, "object_store_mb": 100},
    # tests of tracking turn it on against their own store
    "tracking": {"enabled": False, "grid_every": 500, "grid_sampler": "unipc"},
    # dvc.yaml's optional stages track these sections, so a params.yaml must have them (off: only a note is written)
    "figures": {"enabled": False},
    "sampler_table": {"enabled": False, "num_samples": 200, "ddim_steps": [10, 20, 50, 100],
                      "solvers": ["dpm++2m", "unipc"], "batch_size": 100},
}


@pytest.fixture
def tiny_config():
    """Factory: ``tiny_config({"train.steps": 3})`` -> a validated tiny :class:`Config`."""

    def make(overrides: dict | None = None) -> Config:
        import json

        from tasks.lib.config import apply_overrides, from_dict

        return from_dict(apply_overrides(json.loads(json.dumps(TINY)), overrides))

    return make


@pytest.fixture
def default_config() -> Config:
    return load_config(REPO / "params.yaml")


@pytest.fixture
def tiny_params() -> dict:
    """A fresh copy of the tiny params as a plain mapping (to write a params.yaml)."""
    import json

    return json.loads(json.dumps(TINY))


@pytest.fixture(scope="module")
def tiny_unet() -> UNet:
    """A real tiny UNet whose zero-initialised output layers are perturbed, so its output depends on its input."""
    torch.manual_seed(0)
    model = UNet(1, 8, 16, (1, 2), 1, (4,), 0.0, 8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory) -> Path:
    """A folder with the digits artifact (``dataset/``) and the tiny model trained for 6 steps in this process by the
    train stage's own loop (``checkpoints/``, ``train_loss.tsv``). Read-only for the tests that share it."""
    import json

    from tasks.lib.config import apply_overrides, from_dict
    from tasks import fetch
    from tasks.train import run_local

    work = tmp_path_factory.mktemp("tiny_trained")
    cfg = from_dict(apply_overrides(json.loads(json.dumps(TINY)), {}))
    fetch.run(cfg, work / "dataset")
    run_local(cfg, work / "dataset", work / "checkpoints", work / "train_loss.tsv", threads=1)
    return work


# -- diffusers folders (tests/test_diffusers_io.py, tests/test_bad_input.py) -----------------------------------------
# The published google/ddpm-* layout (ddpm/diffusers_io.py), tiny: 1x8x8, two levels, attention at 4x4.
TINY_DIFFUSERS_UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None, norm_num_groups=4,
                           downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6)


def save_diffusers_pipeline(dest: Path, unet: dict | None = None, scheduler: dict | None = None, seed: int = 0,
                            std: float = 0.02):
    """A real ``DDPMPipeline`` folder at ``dest``: a ``UNet2DModel`` of ``unet``'s config (the tiny published layout by
    default; a dict may be a published config.json) with N(0, std) weights, and a ``DDPMScheduler`` of ``scheduler``
    (diffusers' defaults by default). Returns the UNet (eval mode)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    model = UNet2DModel.from_config(dict(TINY_DIFFUSERS_UNET) if unet is None else unet).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random, not the zero-initialised outputs, so every weight shows in the prediction
        for p in model.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g))
    DDPMPipeline(unet=model, scheduler=DDPMScheduler.from_config(scheduler or {})).save_pretrained(dest)
    return model


# -- a real MLflow server on loopback (tests/test_tracking.py, tests/test_browser.py) ------------------------------
from tools.screenshots import free_port, stop_group  # noqa: E402  (re-exported: `from conftest import free_port`)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a temporary SQLite store and proxied artifacts, shared by the test
    modules (each logs into its own experiment); killed at the end.

    Yields a callable waiting for its /health (so the caller can do other work while it starts)."""
    import requests

    root = tmp_path_factory.mktemp("mlflow-server")
    uri = f"http://127.0.0.1:{free_port()}"
    log = open(root / "server.log", "w")
    # as `make mlflow-ui` runs it: MLflow's job runner off (8 more processes, for server-side jobs nothing here uses)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", uri.rsplit(":", 1)[1],
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def ready(timeout: float = 180.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited ({proc.returncode}):\n{(root / 'server.log').read_text()[-3000:]}")
            try:
                if requests.get(f"{uri}/health", timeout=2).status_code == 200:
                    return uri
            except requests.RequestException:
                pass
            time.sleep(0.5)
        pytest.fail(f"mlflow server not healthy after {timeout} s:\n{(root / 'server.log').read_text()[-3000:]}")

    yield ready
    stop_group(proc)
    log.close()


# -- object storage: an S3-compatible server on loopback (tests/s3.py) ---------------------------------------------
@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, one per session, always stopped. Yields a :class:`s3.S3Server`: ``endpoint``
    (``http://127.0.0.1:<port>``), ``env()`` / ``subprocess_env()`` (what a client needs), ``client()`` (boto3),
    ``bucket()`` (a new bucket)."""
    from s3 import S3Server

    server = S3Server().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh, empty bucket of :func:`s3_server` (a :class:`s3.Bucket`: ``url`` is ``s3://<name>``, ``upload``,
    ``keys``, ``read``), with this process's AWS variables pointed at the server for the test (pyarrow, botocore
    and DVC read them); a subprocess gets the same from ``s3_server.subprocess_env()``."""
    from s3 import AWS_VARIABLES

    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server.bucket()


# -- a two-node Ray cluster whose second node shares no output folder with the driver (tests/raycluster.py) ---------
@pytest.fixture
def isolated_ray_cluster(tmp_path):
    """Factory: ``isolated_ray_cluster(masked, extra_env=None, node_cpus=2)`` starts a head with no CPUs and a second
    node with every CPU that sees each folder of ``masked`` as an empty tmpfs (its own mount namespace), and
    returns a :class:`raycluster.TwoNodes` (``env`` joins it: ``RAY_ADDRESS`` and the token; ``node_id``,
    ``head_id``). ``extra_env`` (e.g. ``s3_server.env()``) reaches both nodes' processes, Ray's workers included.
    Both nodes are stopped at the end of the test, and a surviving process fails it. Needs root (mount)."""
    from contextlib import ExitStack

    from raycluster import two_node_cluster

    with ExitStack() as stack:
        def start(masked, extra_env: dict | None = None, node_cpus: int = 2):
            return stack.enter_context(two_node_cluster(tmp_path, masked, node_cpus, extra_env, cwd=REPO))

        yield start
