"""Stage `train`: Algorithm 1 under Ray Train (DDP over gloo on CPU, nccl on GPU), resumable.

One flat loop per worker: uniform t, eps-prediction MSE (L_simple), Adam with linear warm-up, grad-norm
clipping, EMA. Every ``train.checkpoint_every`` steps rank 0 writes a checkpoint (the atomic, weights-only format of
ddpm/checkpoint.py) and the loss log up to that step into a local temporary folder and hands it to Ray Train
(``ray.train.report``), which persists it in ``ray.storage`` (a local or shared path, or object storage such as
``s3://``) and keeps the newest ``train.keep_checkpoints``. Nothing passes between the workers and the driver by
path, so the workers may run on nodes that share no file system with it (docs/scaling.md, section 8). At the end
the driver copies the kept checkpoints into ``--checkpoints`` (DVC's output) and the newest one's loss log to
``--log``.

A rerun, a restarted worker group or a new driver resumes from the newest checkpoint through Ray Train (one run per
run key, tasks/lib/runkey.py: checkpoints made with other params, another lr or dataset, belong to another run and
training restarts), or from ``--checkpoints`` when that folder holds a newer one made with the same params (a fresh
clone after ``dvc pull``, another ``ray.storage``).

    python -m tasks.train --params params.yaml --data data/dataset --checkpoints checkpoints \
        --log metrics/train_loss.tsv --metrics metrics/train.json
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ddpm.checkpoint import (
    atomic_write_bytes,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    prune_checkpoints,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ddpm.ema import EMA
from ddpm.perf import make_adam, prepare_model
from ddpm.pretrained import build_diffusion
from ddpm.unet import UNet
from tasks.lib.config import Config, load_config, write_resolved

from .lib.callbacks import CallbackList, TrainCallback, train_callbacks
from .lib.cli import run_cli, stage_parser
from .lib.cluster import ensure_ray, nodes_missing, worker_nodes_elsewhere
from .lib.errors import StageError
from .lib.files import absolute, check_writable, read_json, sha256_file, write_json
from .lib.inputs import check_for_dvc_stage
from .lib.runkey import run_key, run_name
from .lib.shards import SplitReader, TrainStream, is_url, open_dataset, ray_dataset, ray_epoch, ship_split
from .lib.storage import CHECKPOINT_DIR, RunCheckpoint, check as check_storage, check_shared, checkpoint_folder, \
    run_checkpoints, storage_path
from .lib.workers import WorkerPlan, check_local_gpus, plan_workers

LOG_FIELDS = ["step", "loss", "lr", "grad_norm", "images_per_s"]


class NonFiniteLoss(StageError):
    """The loss became NaN or infinite; the last good checkpoint is kept untouched."""


LOSS_LOG = "train_loss.tsv"  # the loss log's name beside the weights in each checkpoint folder Ray Train keeps
PROGRESS_LINE_S = 10.0  # without a terminal, the training progress is one line this often (not one per update)


class _Lines:
    """A stream for tqdm without a terminal: each redraw as one line (tqdm writes "\r" + the bar)."""

    def __init__(self, stream):
        self.stream = stream
        self.encoding = getattr(stream, "encoding", None)  # tqdm draws with unicode blocks when it may

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip("\n")
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def lr_factor(step: int, cfg: Config) -> float:
    """The multiple of ``train.lr`` used at 0-based ``step``: linear warm-up over ``warmup_steps`` (the paper: 5,000),
    then constant or cosine decay to 0."""
    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.lr_schedule == "cosine":
        span = max(1, t.steps - t.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - t.warmup_steps) / span)))
    return 1.0


def lr_at(step: int, cfg: Config) -> float:
    """The learning rate at 0-based ``step`` (what the loop's scheduler gives the optimizer)."""
    return cfg.train.lr * lr_factor(step, cfg)


def make_scheduler(opt: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """torch's LambdaLR over :func:`lr_factor`: stepped after each optimizer step, its state (the step count) goes
    into the checkpoint, so a resumed run continues the schedule exactly."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg))


def write_loss_log(path: Path, rows: list[dict[str, Any]]) -> None:
    def write(f):
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=LOG_FIELDS, delimiter="\t", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        f.write(buf.getvalue().encode())

    atomic_write_bytes(path, write)


def parse_loss_log(text: str, upto_step: int) -> list[dict[str, Any]]:
    """The rows of a loss log's text up to ``upto_step``."""
    import io

    rows = [r for r in csv.DictReader(io.StringIO(text, newline=""), delimiter="\t") if r.get("step", "").isdigit()]
    return [r for r in rows if int(r["step"]) <= upto_step]


def read_loss_log(path: Path, upto_step: int) -> list[dict[str, Any]]:
    """Rows of an earlier run's log up to ``upto_step`` (the resumed checkpoint), to continue it."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return parse_loss_log(f.read(), upto_step)


def _set_aside_incompatible(ckpt_dir: Path, key: dict[str, Any], say) -> None:
    """Remove checkpoints made with other params, so a changed lr or dataset trains from scratch."""
    ckpts = list_checkpoints(ckpt_dir)
    if not ckpts:
        return
    marker = ckpt_dir / "run_key.json"
    old = read_json(marker) if marker.is_file() else None
    if old == key:
        return
    changed = sorted(k for k in key if old is None or old.get(k) != key.get(k)) if old else ["unknown"]
    say(f"checkpoints in {ckpt_dir} were made with other params ({', '.join(changed)} differ); training from scratch")
    for _, p in ckpts:
        p.unlink()


@dataclass(frozen=True)
class TrainJob:
    """What every worker's training loop needs, handed to the Ray Train workers as it is (Ray pickles it, the frozen
    config included): the params, the training split's reader, the driver's paths (absolute) and rank 0's
    callbacks. The workers read no path of the driver's but the dataset's, and that only when the split is not
    shipped through Ray's object store (tasks/lib/shards.py ``ship_split``)."""

    cfg: Config
    data: str  # the dataset folder or URL
    checkpoints: Path  # the driver's checkpoint folder (DVC's output); written by the workers only without Ray
    log: Path
    data_sha256: str
    run_key: dict[str, Any]
    callbacks: CallbackList
    split: Optional[SplitReader] = None  # the training split (None: open ``data``), possibly shipped
    threads: int = 1  # intra-op threads of each worker
    ray_data: bool = False  # train.loader ray-data: the batches come from Ray Train's dataset shard
    seed: Any = None  # a Ray object holding a Resume: the driver's own checkpoint, when newer than Ray's newest


@dataclass(frozen=True)
class Resume:
    """What a training resumes from: a checkpoint's state, the loss log's rows up to its step, and its name."""

    state: dict[str, Any]
    rows: list[dict[str, Any]]
    where: str

    @property
    def step(self) -> int:
        return int(self.state["step"])


class FolderCheckpoints:
    """Checkpoints in a folder of this machine, for the loop without Ray (:func:`run_local`): the newest valid one
    resumed, each new one written atomically with the loss log beside it, the newest ``train.keep_checkpoints``
    kept."""

    def __init__(self, job: TrainJob, rank: int = 0):
        self.job, self.is_main = job, rank == 0

    def latest(self) -> Optional[Resume]:
        folder = self.job.checkpoints
        state = load_latest(folder, map_location="cpu", warn=print if self.is_main else None)
        if state is None:
            return None
        step = int(state["step"])
        return Resume(state, read_loss_log(self.job.log, step), checkpoint_path(folder, step).name)

    def checkpoint(self, step: int, build_state, rows: list[dict[str, Any]], loss: float) -> None:
        if not self.is_main:
            return
        save_checkpoint(checkpoint_path(self.job.checkpoints, step), build_state())
        write_loss_log(self.job.log, rows)
        prune_checkpoints(self.job.checkpoints, self.job.cfg.train.keep_checkpoints)


class RayCheckpoints:
    """Checkpoints through Ray Train's storage, in a Ray Train worker. Rank 0 writes each one (the checkpoint file
    and the loss log so far) into a temporary folder of its node and reports it; Ray Train copies it into
    ``ray.storage`` and prunes to ``CheckpointConfig(num_to_keep)``. The other ranks report the same step without a
    checkpoint: Ray Train V2 wants every worker to report, in step. A worker resumes from ``get_checkpoint()`` (Ray's
    newest) or from the driver's newer one (:attr:`TrainJob.seed`)."""

    def __init__(self, job: TrainJob, rank: int):
        self.job, self.rank = job, rank

    def latest(self) -> Optional[Resume]:
        import ray
        import ray.train

        found = None
        reported = ray.train.get_checkpoint()
        if reported is not None:
            with checkpoint_folder(reported) as folder:  # the folder itself on a file system; a download from a bucket
                newest = list_checkpoints(folder)[-1:]
                if not newest:
                    raise StageError(f"{reported.path}: a checkpoint folder of Ray Train without a ckpt_*.pt file")
                step, path = newest[0]
                found = Resume(load_checkpoint(path), read_loss_log(folder / LOSS_LOG, step),
                               f"{path.name}, kept by Ray Train")
        seed = ray.get(self.job.seed) if self.job.seed is not None else None
        return seed if seed is not None and (found is None or seed.step > found.step) else found

    def checkpoint(self, step: int, build_state, rows: list[dict[str, Any]], loss: float) -> None:
        import ray.train

        name, metrics = CHECKPOINT_DIR.format(step=step), {"step": step, "loss": loss}
        if self.rank != 0:
            ray.train.report(metrics, checkpoint_dir_name=name)
            return
        tmp = Path(tempfile.mkdtemp(prefix="ddpm-ckpt-"))
        try:
            path = checkpoint_path(tmp, step)
            save_checkpoint(path, build_state())
            write_loss_log(tmp / LOSS_LOG, rows)
            # its hash lets the driver skip copying a file it already holds
            ray.train.report({**metrics, "sha256": sha256_file(path)}, checkpoint_dir_name=name,
                             checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def train_loop_per_worker(config: dict[str, TrainJob]) -> Optional[dict[str, Any]]:
    """The body each Ray Train worker runs; ``config["job"]`` is the :class:`TrainJob`.

    A user error (a NaN loss, a bad dataset) is returned, not raised: Ray would retry a raised error
    ``train.max_failures`` times from the last checkpoint, and a deterministic error only happens again. Rank 0's
    return value reaches the driver (``Result.return_value``). Worker deaths (a killed process, a lost node) still
    raise, and Ray restarts those."""
    import ray.train
    import ray.train.torch

    job, ctx = config["job"], ray.train.get_context()
    rank = ctx.get_world_rank()
    try:
        train_loop(job, rank, ctx.get_world_size(), ray.train.torch.get_device(),
                   wrap=lambda m: ray.train.torch.prepare_model(m, move_to_device=False),
                   store=RayCheckpoints(job, rank))
    except StageError as e:
        print(f"error: {e}")
        return {"type": type(e).__name__, "message": str(e), "rank": rank}
    return None


def train_loop(
    job: TrainJob,
    rank: int = 0,
    world: int = 1,
    device: torch.device | str = "cpu",
    wrap=lambda m: m,
    store: Optional[FolderCheckpoints | RayCheckpoints] = None,
) -> None:
    """One flat training loop (Algorithm 1). Under Ray, ``wrap`` is DDP and ``store`` Ray Train's storage; alone
    (rank 0 of 1, e.g. for benchmarks) it is the same loop in this process, with checkpoints in ``job.checkpoints``."""
    cfg = job.cfg
    tc = cfg.train
    store = store or FolderCheckpoints(job, rank)
    torch.set_num_threads(max(1, job.threads))
    device = torch.device(device)
    is_main = rank == 0

    if tc.batch_size % world:
        raise StageError(f"train.batch_size: {tc.batch_size} is not divisible by {world} workers")
    local_batch = tc.batch_size // world

    # The training split streams from its shards: this worker's disjoint part of each epoch, shuffled, read ahead
    # by a thread, uint8 until it reaches the device (tasks/lib/shards.py TrainStream).
    split = job.split or open_dataset(job.data).train
    if len(split) < tc.batch_size:
        raise StageError(f"train.batch_size: {tc.batch_size} exceeds the {len(split)} training images")
    buffer_rows = (tc.shuffle_buffer_mb << 20) // math.prod(split.shape)
    stream = TrainStream(split, local_batch, rank, world, tc.seed, buffer_rows)
    steps_per_epoch = stream.steps_per_epoch
    if job.ray_data:  # train.loader ray-data: Ray Data reads the shards, Ray Train hands out parts
        import ray.train

        data_shard = ray.train.get_dataset_shard("train")

        def epoch_batches(epoch: int, skip: int):
            return ray_epoch(data_shard, local_batch, steps_per_epoch, split.shape, buffer_rows,
                             (tc.seed * 1_000_003 + epoch) * 1009 + rank, skip)
    else:
        epoch_batches = stream.epoch
    pin = device.type == "cuda"

    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    model = prepare_model(UNet.from_config(cfg.unet_config()).to(device), channels_last=tc.channels_last)
    ema = EMA(model, tc.ema_decay)
    opt = make_adam(model.parameters(), tc.lr, tc.adam_impl)
    sched = make_scheduler(opt, cfg)
    diffusion = build_diffusion(cfg.diffusion.model_dump())

    step, rows, saved = 0, [], None  # saved: the step of the newest checkpoint this training can fall back to
    resume = store.latest()
    if resume is not None:
        state = resume.state
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step = saved = resume.step
        if "scheduler" in state:
            sched.load_state_dict(state["scheduler"])
        else:  # a checkpoint from before the scheduler was stored: the schedule is a function of the step alone
            sched.last_epoch = step
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
        if "rng" in state:
            set_rng_state(state["rng"])
        rows = resume.rows
        if is_main:
            print(f"resuming from step {step} ({resume.where})")
    ddp_model = prepare_model(wrap(model), compile=tc.compile)
    # Rank 0 reports to the trackers' callbacks (tasks/lib/callbacks.py), which travelled here from the driver.
    callbacks: CallbackList = job.callbacks if is_main else CallbackList([])
    callbacks.on_train_start(cfg, step, rows)
    if step == 0:  # the initial weights, before any update
        callbacks.on_step_end(0, ema.module, diffusion)

    def state_at(at_step: int) -> dict[str, Any]:
        return {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "step": at_step, "rng": rng_state(),
                "config": {"model": cfg.unet_config().to_dict(), "diffusion": cfg.diffusion.model_dump(),
                           "params": cfg.to_dict(), "data_sha256": job.data_sha256}}

    amp = device.type == "cuda" and tc.precision == "bf16"
    bar = None
    if is_main:
        from tqdm.auto import tqdm

        # In a terminal, one bar redrawn in place; in a Ray worker (no terminal: each redraw becomes a forwarded line)
        # or a log, one whole line every PROGRESS_LINE_S seconds: no carriage returns (Ray forwarded each as an empty
        # line of its own), and tqdm's monitor thread, which redraws a bar idle for maxinterval, only for a stall.
        tty = sys.stderr.isatty()
        bar = tqdm(total=tc.steps, initial=step, desc="train", unit="step", file=None if tty else _Lines(sys.stderr),
                   mininterval=2.0 if tty else PROGRESS_LINE_S, maxinterval=10.0 if tty else 6 * PROGRESS_LINE_S)
    ddp_model.train()
    epoch, offset = divmod(step, steps_per_epoch)
    t_log, seen = time.perf_counter(), 0
    while step < tc.steps:
        # A resumed run starts at the batch where the checkpoint stopped: the epoch's order depends on the seed,
        # the epoch and the worker layout alone, so this is the batch the uninterrupted run would have read next.
        for batch in epoch_batches(epoch, offset):
            # One seed per (step, rank): t, noise and dropout are the same whether or not the run was resumed.
            torch.manual_seed((tc.seed * 1_000_003 + step) * 1009 + rank)
            images = torch.from_numpy(batch)
            if pin:
                images = images.pin_memory()
            x0 = images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
            if tc.random_flip:  # on the fly, on the device
                flip = torch.rand(x0.shape[0], device=device) < 0.5
                x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
            lr = opt.param_groups[0]["lr"]  # the scheduler's value for this step (logged below)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = diffusion.training_loss(ddp_model, x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            loss_value = float(loss.detach())
            # The gradient norm is all-reduced by DDP, so a NaN on any rank stops every rank at the same step.
            if not (math.isfinite(loss_value) and math.isfinite(float(grad_norm))):
                what = f"loss became {loss_value}" if not math.isfinite(loss_value) else \
                    f"gradient norm became {float(grad_norm)}"
                # the driver's folder: Ray's copy of it lands there too when the stage ends (collect_checkpoints)
                kept = (f"the last good checkpoint {checkpoint_path(job.checkpoints, saved)} is kept" if saved
                        else "no checkpoint was written yet")
                raise NonFiniteLoss(f"{what} at step {step + 1}; stopped before the update, {kept} "
                                    "(lower train.lr or enable train.grad_clip)")
            opt.step()
            sched.step()
            ema.update(model)
            step += 1
            seen += x0.shape[0] * world
            if bar is not None:
                bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                now = time.perf_counter()
                rows.append({"step": step, "loss": f"{loss_value:.6f}", "lr": f"{lr:.6g}",
                             "grad_norm": f"{float(grad_norm):.4f}", "images_per_s": f"{seen / (now - t_log):.1f}"})
                callbacks.on_log(rows[-1])
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)  # shown at the bar's next redraw
                t_log, seen = now, 0
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                store.checkpoint(step, lambda: state_at(step), rows, loss_value)
                saved = step
            callbacks.on_step_end(step, ema.module, diffusion)
            if step >= tc.steps:
                break
        epoch, offset = epoch + 1, 0
    if bar is not None:
        bar.close()
    callbacks.on_train_end(step, ema.module)


def prepare(cfg: Config, data_dir, ckpt_dir, log_path, callbacks: Optional[list[TrainCallback]] = None) -> TrainJob:
    """Check the dataset against the params, set aside incompatible checkpoints, write the resolved config, make the
    callbacks (``None``: the installed trackers'; :func:`begin` starts them); return the workers' job (absolute
    paths: Ray workers change directory)."""
    # A dataset may be a URL (s3://...: its shards are read in place, tasks/lib/shards.py).
    data_dir = str(data_dir) if is_url(data_dir) else absolute(data_dir)
    ckpt_dir, log_path = absolute(ckpt_dir), absolute(log_path)
    dataset = open_dataset(data_dir)
    ds_meta = dataset.meta
    if tuple(ds_meta["shape"]) != cfg.data.shape:
        raise StageError(f"{data_dir}: dataset shape {ds_meta['shape']} differs from the params' data shape "
                         f"{list(cfg.data.shape)}; rerun the fetch stage")
    check_writable(ckpt_dir, log_path.parent)
    key = run_key(cfg, ds_meta["sha256"])
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for tmp in remove_stale_temporaries(ckpt_dir):  # left by a process killed mid-write
        print(f"removed {tmp.name}, a partial file of an interrupted write")
    _set_aside_incompatible(ckpt_dir, key, print)
    write_json(ckpt_dir / "run_key.json", key)
    write_resolved(cfg, ckpt_dir)
    cbs = train_callbacks(cfg) if callbacks is None else CallbackList(callbacks)
    return TrainJob(cfg, str(data_dir), ckpt_dir, log_path, ds_meta["sha256"], key, cbs, split=dataset.train)


def begin(job: TrainJob, start_step: int) -> None:
    """Say where the training starts (``start_step``: the checkpoint it resumes, 0 for none) and start the
    callbacks."""
    if start_step >= job.cfg.train.steps:
        print(f"already trained: the checkpoint of step {start_step} reaches train.steps={job.cfg.train.steps}")
    job.callbacks.on_fit_start(job.cfg, job.data_sha256, start_step == 0)


def run_local(cfg: Config, data_dir, ckpt_dir, log_path, threads: Optional[int] = None,
              device: str = "cpu", callbacks: Optional[list[TrainCallback]] = None) -> TrainJob:
    """The same loop in this process, without Ray (benchmarks, debugging; the shards loader whatever
    ``train.loader`` says), its checkpoints in ``ckpt_dir``. Returns the job it ran."""
    job = replace(prepare(cfg, data_dir, ckpt_dir, log_path, callbacks), threads=threads or torch.get_num_threads())
    begin(job, ([0] + [s for s, _ in list_checkpoints(job.checkpoints)])[-1])
    loop_here(job, device)
    return job


def loop_here(job: TrainJob, device: str = "cpu") -> None:
    """The loop in this process (checkpoints in ``job.checkpoints``), the callbacks told how the fit ended."""
    try:
        train_loop(job, device=device)
    except BaseException:
        job.callbacks.on_fit_end(False)
        raise
    job.callbacks.on_fit_end(True)


def local_resume(job: TrainJob, after_step: int) -> Optional[Resume]:
    """The newest valid checkpoint of the driver's folder (and its loss log) when it is newer than ``after_step``
    (Ray's newest of this run): a fresh clone after ``dvc pull``, or another ``ray.storage`` than the one that made
    it. The workers resume from it through the object store."""
    newest = list_checkpoints(job.checkpoints)[-1:]
    if not newest or newest[0][0] <= after_step:
        return None
    state = load_latest(job.checkpoints, map_location="cpu", warn=print)
    if state is None or int(state["step"]) <= after_step:
        return None
    step = int(state["step"])
    return Resume(state, read_loss_log(job.log, step), f"{checkpoint_path(job.checkpoints, step)}")


def collect_checkpoints(job: TrainJob, kept: list[RunCheckpoint]) -> None:
    """Copy what Ray Train keeps of the run (``kept``, in ``ray.storage``) into the driver's checkpoint folder, DVC's
    output, each file atomically; a file already there with the reported hash is not copied again. The folder then
    holds the newest ``train.keep_checkpoints`` of its own and Ray's (Ray's copy wins a step both hold), and ``--log``
    the newest Ray checkpoint's loss log. Copies come before deletions: an interruption leaves a file too many,
    never one too few."""
    folder, keep = job.checkpoints, job.cfg.train.keep_checkpoints
    local = dict(list_checkpoints(folder))
    reported = {k.step: k for k in kept}
    wanted = sorted(set(local) | set(reported))[-keep:]
    for step in wanted:
        k, dest = reported.get(step), checkpoint_path(folder, step)
        if k is not None and not (dest.is_file() and sha256_file(dest) == k.metrics.get("sha256")):
            k.copy_to(dest.name, dest)
    for step, path in local.items():
        if step not in wanted:
            path.unlink(missing_ok=True)
    newest = reported.get(wanted[-1]) if wanted else None
    if newest is not None:
        write_loss_log(job.log, parse_loss_log(newest.read_text(LOSS_LOG), newest.step))


def training_split(job: TrainJob, nodes: list[dict]) -> Optional[SplitReader]:
    """The training split as the workers read it: from its folder or URL, or, when Ray nodes other than the driver's
    (``nodes``) do not see that folder (no shared file system), through Ray's object store (tasks/lib/shards.py
    ``ship_split``; docs/scaling.md section 8 says up to what size)."""
    import ray

    if is_url(job.data) or not nodes:
        return job.split
    missing = nodes_missing(Path(job.data) / "dataset.json", nodes)
    if not missing:
        return job.split
    smallest = min(n["Resources"].get("object_store_memory", 0) for n in ray.nodes() if n.get("Alive"))
    print(f"train: Ray node(s) {', '.join(missing)} do not see {job.data}; its training split travels through Ray's "
          "object store", flush=True)
    return ship_split(job.split, smallest)


def state_api_available() -> bool:
    """Whether Ray's State API answers. The dashboard serves it, and the Ray this project starts (and ``ray start``
    from this environment, which lacks the dashboard's packages) runs without one."""
    import ray
    from ray.util.state import list_actors
    from ray.util.state.exception import RayStateApiException

    try:  # the address of the Ray this process uses: with none, Ray looks for one and may find several
        list_actors(address=ray.get_runtime_context().gcs_address, limit=1, timeout=2, raise_on_missing_output=False)
        return True
    except (RayStateApiException, ConnectionError):
        return False


def trainer_class(state_api: bool, datasets: bool):
    """Ray Train's ``TorchTrainer``, less the default callbacks that would start actors with nothing to do here.

    - Without a State API, its placement-group cleaner: a detached actor that asks the State API every second whether
      the train controller is still alive, to remove the workers' placement group if it died. Without the API it
      cannot know, never cleans up, and logs "Failed to query Ray Train Controller actor state" on every check (157
      lines in one demo); a local Ray ends with the stage and takes its placement groups with it.
    - Without Ray Datasets (``train.loader`` other than ray-data), its datasets callback: it starts a dataset-manager
      actor for the trainer's datasets even when there are none, a process of its own (Ray, pyarrow, ~2 CPU-seconds
      to start) on every fit; the workers then have no dataset shards, which only ``get_dataset_shard`` would read.
    """
    from ray.train.torch import TorchTrainer

    if state_api and datasets:
        return TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    left_out = tuple(kind for kind, keep in ((PlacementGroupCleanerCallback, state_api), (DatasetsCallback, datasets))
                     if not keep)

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks() if not isinstance(c, left_out)]

    return Trainer


def make_trainer(job: TrainJob, plan: WorkerPlan):
    """Ray Train's trainer of ``job`` over the workers of ``plan``, named by the run key (a rerun resumes it), keeping
    ``train.keep_checkpoints`` in ``ray.storage``, and its DDP backend."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    cfg = job.cfg
    # NCCL refuses two ranks on one GPU: workers that share one (gpus_per_worker < 1) all-reduce over gloo.
    backend = "nccl" if plan.use_gpu and plan.gpus == 1 else "gloo"
    datasets = {"train": ray_dataset(job.split)} if cfg.train.loader == "ray-data" else {}
    trainer = trainer_class(state_api_available(), bool(datasets))(
        train_loop_per_worker,
        train_loop_config={"job": replace(job, threads=plan.threads, ray_data=bool(datasets))},
        datasets=datasets or None,
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=plan.workers, use_gpu=plan.use_gpu,
                                     resources_per_worker=plan.resources),
        run_config=RunConfig(
            name=run_name(job.run_key),
            storage_path=storage_path(cfg.ray.storage),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        ),
    )
    return trainer, backend


def fit(job: TrainJob, trainer) -> float:
    """Run the trainer; raise the user error a worker met (its return value, see :func:`train_loop_per_worker`; not
    Ray's wrapping of it). Returns the fit's seconds."""
    t1 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as e:
        job.callbacks.on_fit_end(False)
        raise _user_error_from(e) from None
    t_fit = time.perf_counter() - t1
    failure = result.return_value
    if failure or result.error is not None:
        job.callbacks.on_fit_end(False)
        if failure:
            cls = NonFiniteLoss if failure.get("type") == "NonFiniteLoss" else StageError
            raise cls(str(failure.get("message", "training failed")))
        raise _user_error_from(result.error)
    job.callbacks.on_fit_end(True)
    return t_fit


# -- train.pretrained: a published model instead of training ---------------------------------------------------------
def _params_not_used(cfg: Config, stored: dict[str, Any]) -> dict[str, list[Any]]:
    """{key: [the params' value, the published model's]} for the model and diffusion keys where the two differ: the
    run uses the published ones (the checkpoint carries them), so these params say nothing about it."""
    import json

    from ddpm.config import DiffusionConfig

    theirs_d = DiffusionConfig(**stored["diffusion"])
    schedule = ("beta_start", "beta_end") if theirs_d.schedule == "linear" else ("cosine_s",)
    keys = [f"model.{k}" for k in type(cfg.model).model_fields] + [
        f"diffusion.{k}" for k in ("schedule", "timesteps", *schedule, "objective")]
    ours = {**{f"model.{k}": v for k, v in cfg.model.model_dump(mode="json").items()},
            **{f"diffusion.{k}": v for k, v in cfg.diffusion.model_dump(mode="json").items()}}
    theirs = {**{f"model.{k}": v for k, v in json.loads(json.dumps(stored["model"])).items()},
              **{f"diffusion.{k}": v for k, v in theirs_d.model_dump(mode="json").items()}}
    return {k: [ours[k], theirs[k]] for k in keys if ours[k] != theirs[k]}


def run_pretrained(cfg: Config, data_dir, ckpt_dir, log_path, metrics_path: Optional[os.PathLike] = None
                   ) -> dict[str, Any]:
    """``train.pretrained``: import the published diffusers model as this run's only checkpoint (step 0; the published
    weights are its raw and EMA weights) instead of training, so that the later stages read it as any checkpoint. No
    Ray, no callbacks (nothing is trained); the loss log is left with its header only. Checkpoints of an earlier
    run are replaced, after the import has succeeded."""
    import shutil
    import tempfile

    from ddpm.diffusers_io import DiffusersFormatError
    from ddpm.pretrained import import_diffusers, load_model
    from ddpm.unet import count_parameters

    from .lib.errors import DataError
    from .lib.inputs import pretrained_problem

    t0 = time.perf_counter()
    problem = pretrained_problem(cfg)  # before anything is written: the folder, its layout, its image shape and T
    if problem:
        raise DataError(f"train.pretrained: {problem}")
    data_dir = str(data_dir) if is_url(data_dir) else absolute(data_dir)
    ckpt_dir, log_path = absolute(ckpt_dir), absolute(log_path)
    ds_meta = open_dataset(data_dir).meta
    if tuple(ds_meta["shape"]) != cfg.data.shape:
        raise StageError(f"{data_dir}: dataset shape {ds_meta['shape']} differs from the params' data shape "
                         f"{list(cfg.data.shape)}; rerun the fetch stage")
    check_writable(ckpt_dir, log_path.parent, *([Path(metrics_path).parent] if metrics_path else []))
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(ckpt_dir)
    for old in ckpt_dir.glob(".import-*"):  # left by an import killed before its rename
        shutil.rmtree(old, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=ckpt_dir, prefix=".import-") as tmp:
        try:
            imported = import_diffusers(cfg.train.pretrained, tmp, step=0)
        except DiffusersFormatError as e:  # e.g. weights that diffusers cannot load
            raise DataError(f"train.pretrained: {e}") from None
        path = checkpoint_path(ckpt_dir, 0)
        earlier = [p for _, p in list_checkpoints(ckpt_dir) if p != path]  # a training's: set aside
        for p in earlier:
            p.unlink()
        os.replace(imported, path)
    if earlier:
        print(f"replaced {len(earlier)} checkpoint(s) of an earlier run in {ckpt_dir} with the published model")
    write_json(ckpt_dir / "run_key.json", run_key(cfg, ds_meta["sha256"]))
    write_resolved(cfg, ckpt_dir)
    write_loss_log(log_path, [])
    model, _, state = load_model(path)
    stored = state["config"]
    summary = {
        "pretrained": cfg.train.pretrained, "source": stored["diffusers"]["source"], "trained": False, "steps": 0,
        "checkpoint": str(path), "parameters": count_parameters(model), "model": stored["model"],
        "diffusion": stored["diffusion"],
        "sampling_hints": {k: stored["diffusers"].get(k) for k in ("variance", "clip_denoised")},
        "params_not_used": _params_not_used(cfg, stored), "wall_s": round(time.perf_counter() - t0, 2),
    }
    if summary["params_not_used"]:
        print("the published model is used as it is; these model/diffusion params differ and are not used: "
              + ", ".join(f"{k} {a} (model: {b})" for k, (a, b) in summary["params_not_used"].items()))
    differ = [f"sample.{k} {getattr(cfg.sample, k)} (its scheduler's: {v})"
              for k, v in summary["sampling_hints"].items() if v is not None and getattr(cfg.sample, k) != v]
    if differ:  # sampling settings, not the network: the params decide (docs/diffusers.md "Sampling hints")
        print(f"the params sample otherwise than the published scheduler: {', '.join(differ)}")
    if metrics_path:
        write_json(metrics_path, summary)
    return summary


def run(cfg: Config, data_dir, ckpt_dir, log_path, metrics_path: Optional[os.PathLike] = None,
        callbacks: Optional[list[TrainCallback]] = None) -> dict[str, Any]:
    """Train with Ray Train and return a summary (steps, final loss, images/s, Ray start-up and wall times).

    ``data_dir`` is the fetch stage's output; the checkpoints Ray Train keeps in ``ray.storage`` are copied to
    ``ckpt_dir`` at the end, the loss log to ``log_path``. ``callbacks`` (tasks/lib/callbacks.py; ``None``: one per
    installed tracker) hear about the training, rank 0's hooks in the Ray worker. With ``train.pretrained`` set
    nothing is trained: :func:`run_pretrained`.
    """
    if cfg.train.pretrained:
        return run_pretrained(cfg, data_dir, ckpt_dir, log_path, metrics_path)
    check_local_gpus(cfg, "train", cfg.train.gpus_per_worker)  # before anything is written or Ray starts
    check_storage(cfg.ray.storage)  # Ray Train's storage answers and takes writes (tasks/lib/storage.py)
    if metrics_path:
        check_writable(Path(metrics_path).parent)
    import ray

    job = prepare(cfg, data_dir, ckpt_dir, log_path, callbacks)
    name = run_name(job.run_key)
    kept = run_checkpoints(cfg.ray.storage, name)
    seed = local_resume(job, kept[-1].step if kept else 0)
    start_step = seed.step if seed else kept[-1].step if kept else 0  # where the workers resume
    begin(job, start_step)
    if start_step >= cfg.train.steps:
        return already_trained(job, kept, start_step, metrics_path)

    t0 = time.perf_counter()
    how = ensure_ray(cfg)
    t_ray = time.perf_counter() - t0
    nodes = worker_nodes_elsewhere()  # workers may land there: what do they see of this machine?
    check_shared(cfg.ray.storage, nodes)
    job = replace(job, split=training_split(job, nodes), seed=None if seed is None else ray.put(seed))
    t = cfg.train
    # Ray Data's tasks (listing and reading the shards) need a CPU the training workers do not hold: Ray Train
    # leaves Ray Data only what the trainer did not reserve, and with every CPU reserved the read never starts.
    plan = plan_workers("train", t.num_workers, t.use_gpu, ray.cluster_resources(),
                        gpus_per_worker=t.gpus_per_worker, spare_cpu=t.loader == "ray-data")
    trainer, backend = make_trainer(job, plan)
    print(f"train: {plan.workers} Ray Train worker(s), each {plan.each()}, DDP over {backend}, {t.steps:,} steps of "
          f"batch {t.batch_size}; {how}", flush=True)
    try:
        t_fit = fit(job, trainer)
    finally:  # a failed training's last good checkpoints belong in --checkpoints too
        collect_checkpoints(job, run_checkpoints(cfg.ray.storage, name))
    summary = {**summarize(job, start_step),
               "num_workers": plan.workers, "use_gpu": plan.use_gpu, "gpus_per_worker": plan.gpus, "backend": backend,
               "ray": how, "ray_startup_s": round(t_ray, 2), "fit_wall_s": round(t_fit, 2)}
    if metrics_path:
        write_json(metrics_path, summary)
    return summary


def already_trained(job: TrainJob, kept: list[RunCheckpoint], start_step: int,
                    metrics_path: Optional[os.PathLike]) -> dict[str, Any]:
    """Nothing to train: the newest checkpoint, the folder's or Ray Train's (``kept``), reaches ``train.steps``, as
    in a rerun after an edit of the library or of a later stage's params. On Ray Train the loop would only resume
    and stop, after a Ray start and a worker group's (tens of seconds on a laptop); it does that here instead, so the
    callbacks hear the same start and end, and no Ray is started. Ray's newer checkpoints are copied in first."""
    collect_checkpoints(job, kept)
    loop_here(job)
    summary = {**summarize(job, start_step), "already_trained": True, "num_workers": 0, "use_gpu": False,
               "gpus_per_worker": 0.0, "backend": None, "ray": "not started: already trained", "ray_startup_s": 0.0,
               "fit_wall_s": 0.0}
    if metrics_path:
        write_json(metrics_path, summary)
    return summary


def summarize(job: TrainJob, start_step: int) -> dict[str, Any]:
    """What the driver's folder holds after a training: the newest checkpoint, the final loss, images/s."""
    rows = read_loss_log(job.log, job.cfg.train.steps)
    this_run = [r for r in rows if int(r["step"]) > start_step]  # a resumed log holds the earlier runs' rows too
    newest = list_checkpoints(job.checkpoints)[-1:]
    return {
        "steps": newest[0][0] if newest else 0,
        "resumed_from_step": start_step,
        "final_loss": float(rows[-1]["loss"]) if rows else None,
        # the first interval holds the first step's one-off costs (compilation, cuDNN's autotuning): left out
        "images_per_s": _median([float(r["images_per_s"]) for r in this_run[1:]] or [0.0]),
        "checkpoint": str(newest[0][1]) if newest else None,
    }


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _user_error_from(e: BaseException) -> BaseException:
    """Ray wraps worker exceptions; surface our own user errors (NaN loss, bad batch size) as themselves."""
    seen = set()
    cur: Optional[BaseException] = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, StageError):
            return cur
        for attr in ("cause", "__cause__", "worker_failures"):
            nxt = getattr(cur, attr, None)
            if isinstance(nxt, dict) and nxt:
                nxt = next(iter(nxt.values()))
            if isinstance(nxt, BaseException):
                cur = nxt
                break
        else:
            cur = None
    text = str(e).strip().splitlines()
    return StageError(f"training failed: {text[-1] if text else type(e).__name__}")


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = stage_parser("Train the DDPM UNet with Ray Train (Algorithm 1); resumes from the newest checkpoint.")
    p.add_argument("--data", default="data/dataset", help="dataset folder from the fetch stage")
    p.add_argument("--checkpoints", default="checkpoints", help="checkpoint folder (resumed from when present)")
    p.add_argument("--log", default="metrics/train_loss.tsv", help="per-step loss log (TSV)")
    p.add_argument("--metrics", default="metrics/train.json", help="training summary (JSON)")
    args = p.parse_args(argv)
    cfg = load_config(args.params, args.overrides)
    check_for_dvc_stage(cfg)  # under `dvc repro`: the inputs of this stage and the later ones, before any compute
    summary = run(cfg, args.data, args.checkpoints, args.log, args.metrics)
    if summary.get("pretrained"):
        print(f"imported {summary['pretrained']} ({summary['parameters']:,} parameters), not trained -> "
              f"{summary['checkpoint']}")
        return summary
    if summary.get("already_trained"):
        print(f"nothing to train: step {summary['steps']} reached before this run (loss {summary['final_loss']}); "
              f"Ray not started -> {summary['checkpoint']}")
        return summary
    print(f"trained to step {summary['steps']}: loss {summary['final_loss']}, {summary['images_per_s']} images/s, "
          f"Ray start-up {summary['ray_startup_s']} s, fit {summary['fit_wall_s']} s -> {summary['checkpoint']}")
    return summary


if __name__ == "__main__":
    run_cli(main)
