"""Stage `train`: Algorithm 1 under Ray Train (DDP over gloo on CPU, nccl on GPU), resumable.

One flat loop per worker: uniform t, eps-prediction MSE (L_simple), Adam with linear warm-up, grad-norm
clipping, EMA. Rank 0 alone writes files: atomic checkpoints every ``train.checkpoint_every`` steps (the last
``train.keep_checkpoints`` kept) and the loss log, rewritten beside each checkpoint so it never holds steps
that a resume will recompute. Rerunning the stage continues from the newest valid checkpoint made with the same
params; checkpoints made with other params (another lr, another dataset) are set aside and training restarts.

    python -m tasks.train --params params.yaml --data data/dataset --checkpoints checkpoints \
        --log metrics/train_loss.tsv --metrics metrics/train.json
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ddpm.checkpoint import (
    atomic_write_bytes,
    checkpoint_path,
    list_checkpoints,
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
from .lib.cluster import ensure_ray
from .lib.errors import StageError
from .lib.files import absolute, check_writable, read_json, write_json
from .lib.inputs import check_for_dvc_stage
from .lib.runkey import run_key, run_name
from .lib.shards import TrainStream, is_url, open_dataset, ray_dataset, ray_epoch
from .lib.storage import check as check_storage, storage_path
from .lib.workers import WorkerPlan, check_local_gpus, plan_workers

LOG_FIELDS = ["step", "loss", "lr", "grad_norm", "images_per_s"]


class NonFiniteLoss(StageError):
    """The loss became NaN or infinite; the last good checkpoint is kept untouched."""


# A worker that meets a user error (NaN loss, a bad dataset) leaves it here and returns instead of raising: Ray
# would retry a raised error train.max_failures times from the last checkpoint, and a deterministic error only
# happens again. Worker deaths (a killed process, a lost node) still raise, and Ray restarts those.
FAILURE_FILE = ".train_failure.json"
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


def read_loss_log(path: Path, upto_step: int) -> list[dict[str, Any]]:
    """Rows of an earlier run's log up to ``upto_step`` (the resumed checkpoint), to continue it."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if r.get("step", "").isdigit()]
    return [r for r in rows if int(r["step"]) <= upto_step]


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
    config included): the params, absolute paths (workers change directory) and rank 0's callbacks."""

    cfg: Config
    data: str  # the dataset folder or URL
    checkpoints: Path
    log: Path
    data_sha256: str
    run_key: dict[str, Any]
    callbacks: CallbackList
    threads: int = 1  # intra-op threads of each worker
    ray_data: bool = False  # train.loader ray-data: the batches come from Ray Train's dataset shard


def train_loop_per_worker(config: dict[str, TrainJob]) -> None:
    """The body each Ray Train worker runs; ``config["job"]`` is the :class:`TrainJob`."""
    import ray.train
    import ray.train.torch

    job, ctx = config["job"], ray.train.get_context()
    try:
        train_loop(job, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(),
                   wrap=lambda m: ray.train.torch.prepare_model(m, move_to_device=False), report=ray.train.report)
    except StageError as e:
        print(f"error: {e}")
        write_json(job.checkpoints / FAILURE_FILE,
                   {"type": type(e).__name__, "message": str(e), "rank": ctx.get_world_rank()})


def train_loop(
    job: TrainJob,
    rank: int = 0,
    world: int = 1,
    device: torch.device | str = "cpu",
    wrap=lambda m: m,
    report=lambda metrics: None,
) -> None:
    """One flat training loop (Algorithm 1). Under Ray, ``wrap`` is DDP and ``report`` Ray's; alone (rank 0 of
    1, e.g. for benchmarks) it is the same loop in this process."""
    cfg = job.cfg
    tc = cfg.train
    ckpt_dir, log_path = job.checkpoints, job.log
    torch.set_num_threads(max(1, job.threads))
    device = torch.device(device)
    is_main = rank == 0

    if tc.batch_size % world:
        raise StageError(f"train.batch_size: {tc.batch_size} is not divisible by {world} workers")
    local_batch = tc.batch_size // world

    # The training split streams from its shards: this worker's disjoint part of each epoch, shuffled, read ahead
    # by a thread, uint8 until it reaches the device (tasks/lib/shards.py TrainStream).
    split = open_dataset(job.data).train
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

    step, rows = 0, []
    state = load_latest(ckpt_dir, map_location="cpu", warn=print if is_main else None)
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        if "scheduler" in state:
            sched.load_state_dict(state["scheduler"])
        else:  # a checkpoint from before the scheduler was stored: the schedule is a function of the step alone
            sched.last_epoch = step
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
        if "rng" in state:
            set_rng_state(state["rng"])
        if is_main:
            rows = read_loss_log(log_path, step)
            print(f"resuming from step {step} ({checkpoint_path(ckpt_dir, step).name})")
    ddp_model = prepare_model(wrap(model), compile=tc.compile)
    # Rank 0 reports to the trackers' callbacks (tasks/lib/callbacks.py), which travelled here from the driver.
    callbacks: CallbackList = job.callbacks if is_main else CallbackList([])
    callbacks.on_train_start(cfg, step, rows)
    if step == 0:  # the initial weights, before any update
        callbacks.on_step_end(0, ema.module, diffusion)

    def save(at_step: int) -> None:
        if not is_main:
            return
        save_checkpoint(checkpoint_path(ckpt_dir, at_step), {
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "step": at_step, "rng": rng_state(),
            "config": {"model": cfg.unet_config().to_dict(), "diffusion": cfg.diffusion.model_dump(),
                       "params": cfg.to_dict(), "data_sha256": job.data_sha256},
        })
        write_loss_log(log_path, rows)
        prune_checkpoints(ckpt_dir, tc.keep_checkpoints)

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
                last = list_checkpoints(ckpt_dir)[-1:]
                kept = f"the last good checkpoint {last[0][1]} is kept" if last else "no checkpoint was written yet"
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
                save(step)
            callbacks.on_step_end(step, ema.module, diffusion)
            if step >= tc.steps:
                break
        epoch, offset = epoch + 1, 0
    if bar is not None:
        bar.close()
    callbacks.on_train_end(step, ema.module)
    report({"step": step, "loss": float(rows[-1]["loss"]) if rows else float("nan")})


def prepare(cfg: Config, data_dir, ckpt_dir, log_path, callbacks: Optional[list[TrainCallback]] = None) -> TrainJob:
    """Check the dataset against the params, set aside incompatible checkpoints, write the resolved config, start
    the callbacks (``None``: the installed trackers'); return the workers' job (absolute paths: Ray workers change
    directory)."""
    # A dataset may be a URL (s3://...: its shards are read in place, tasks/lib/shards.py).
    data_dir = str(data_dir) if is_url(data_dir) else absolute(data_dir)
    ckpt_dir, log_path = absolute(ckpt_dir), absolute(log_path)
    ds_meta = open_dataset(data_dir).meta
    if tuple(ds_meta["shape"]) != cfg.data.shape:
        raise StageError(f"{data_dir}: dataset shape {ds_meta['shape']} differs from the params' data shape "
                         f"{list(cfg.data.shape)}; rerun the fetch stage")
    check_writable(ckpt_dir, log_path.parent)
    key = run_key(cfg, ds_meta["sha256"])
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / FAILURE_FILE).unlink(missing_ok=True)
    for tmp in remove_stale_temporaries(ckpt_dir):  # left by a process killed mid-write
        print(f"removed {tmp.name}, a partial file of an interrupted write")
    _set_aside_incompatible(ckpt_dir, key, print)
    write_json(ckpt_dir / "run_key.json", key)
    write_resolved(cfg, ckpt_dir)
    done = list_checkpoints(ckpt_dir)
    if done and done[-1][0] >= cfg.train.steps:
        print(f"already trained: {done[-1][1].name} reaches train.steps={cfg.train.steps}")
    cbs = train_callbacks(cfg) if callbacks is None else CallbackList(callbacks)
    cbs.on_fit_start(cfg, ds_meta["sha256"], not done)
    return TrainJob(cfg, str(data_dir), ckpt_dir, log_path, ds_meta["sha256"], key, cbs)


def run_local(cfg: Config, data_dir, ckpt_dir, log_path, threads: Optional[int] = None,
              device: str = "cpu", callbacks: Optional[list[TrainCallback]] = None) -> TrainJob:
    """The same loop in this process, without Ray (benchmarks, debugging; the shards loader whatever
    ``train.loader`` says). Returns the job it ran."""
    job = replace(prepare(cfg, data_dir, ckpt_dir, log_path, callbacks), threads=threads or torch.get_num_threads())
    try:
        train_loop(job, device=device)
    except BaseException:
        job.callbacks.on_fit_end(False)
        raise
    job.callbacks.on_fit_end(True)
    return job


def _raise_worker_failure(ckpt_dir: Path) -> None:
    """Raise the user error a worker left in ``FAILURE_FILE`` (see there), if any."""
    path = ckpt_dir / FAILURE_FILE
    if not path.is_file():
        return
    failure = read_json(path)
    path.unlink(missing_ok=True)
    cls = NonFiniteLoss if failure.get("type") == "NonFiniteLoss" else StageError
    raise cls(str(failure.get("message", "training failed")))


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


def trainer_class(state_api: bool):
    """Ray Train's ``TorchTrainer``; without a State API, one that leaves out its placement-group cleaner.

    The cleaner is a detached actor that asks the State API every second whether the train controller is still
    alive, to remove the workers' placement group if it died. Without the API it cannot know, never cleans up, and
    logs "Failed to query Ray Train Controller actor state" on every check (157 lines in one demo), so it is left out
    there: a local Ray ends with the stage and takes its placement groups with it.
    """
    from ray.train.torch import TorchTrainer

    if state_api:
        return TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class TrainerWithoutCleaner(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks()
                    if not isinstance(c, PlacementGroupCleanerCallback)]

    return TrainerWithoutCleaner


def make_trainer(job: TrainJob, plan: WorkerPlan):
    """Ray Train's trainer of ``job`` over the workers of ``plan``, named by the run key (a rerun resumes it), and
    its DDP backend."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    cfg = job.cfg
    # NCCL refuses two ranks on one GPU: workers that share one (gpus_per_worker < 1) all-reduce over gloo.
    backend = "nccl" if plan.use_gpu and plan.gpus == 1 else "gloo"
    datasets = {"train": ray_dataset(open_dataset(job.data).train)} if cfg.train.loader == "ray-data" else {}
    trainer = trainer_class(state_api_available())(
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
        ),
    )
    return trainer, backend


def fit(job: TrainJob, trainer) -> float:
    """Run the trainer; raise the user error a worker met (not Ray's wrapping of it). Returns the fit's seconds."""
    t1 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as e:
        job.callbacks.on_fit_end(False)
        _raise_worker_failure(job.checkpoints)
        raise _user_error_from(e) from None
    t_fit = time.perf_counter() - t1
    try:
        _raise_worker_failure(job.checkpoints)
        if result.error is not None:
            raise _user_error_from(result.error)
    except StageError:
        job.callbacks.on_fit_end(False)
        raise
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

    ``data_dir`` is the fetch stage's output; checkpoints go to ``ckpt_dir``; the loss log to ``log_path``.
    ``callbacks`` (tasks/lib/callbacks.py; ``None``: one per installed tracker) hear about the training, rank 0's
    hooks in the Ray worker. With ``train.pretrained`` set nothing is trained: :func:`run_pretrained`.
    """
    if cfg.train.pretrained:
        return run_pretrained(cfg, data_dir, ckpt_dir, log_path, metrics_path)
    check_local_gpus(cfg, "train", cfg.train.gpus_per_worker)  # before anything is written or Ray starts
    check_storage(cfg.ray.storage)  # Ray Train's storage answers and takes writes (tasks/lib/storage.py)
    if metrics_path:
        check_writable(Path(metrics_path).parent)
    import ray

    job = prepare(cfg, data_dir, ckpt_dir, log_path, callbacks)
    start_step = ([0] + [s for s, _ in list_checkpoints(job.checkpoints)])[-1]  # where the workers resume

    t0 = time.perf_counter()
    how = ensure_ray(cfg)
    t_ray = time.perf_counter() - t0
    t = cfg.train
    # Ray Data's tasks (listing and reading the shards) need a CPU the training workers do not hold: Ray Train
    # leaves Ray Data only what the trainer did not reserve, and with every CPU reserved the read never starts.
    plan = plan_workers("train", t.num_workers, t.use_gpu, ray.cluster_resources(),
                        gpus_per_worker=t.gpus_per_worker, spare_cpu=t.loader == "ray-data")
    trainer, backend = make_trainer(job, plan)
    print(f"train: {plan.workers} Ray Train worker(s), each {plan.each()}, DDP over {backend}, {t.steps:,} steps of "
          f"batch {t.batch_size}; {how}", flush=True)
    t_fit = fit(job, trainer)
    rows = read_loss_log(job.log, t.steps)
    this_run = [r for r in rows if int(r["step"]) > start_step]  # a resumed log holds the earlier runs' rows too
    newest = list_checkpoints(job.checkpoints)[-1:]
    summary = {
        "steps": newest[0][0] if newest else 0,
        "resumed_from_step": start_step,
        "final_loss": float(rows[-1]["loss"]) if rows else None,
        # the first interval holds the first step's one-off costs (compilation, cuDNN's autotuning): left out
        "images_per_s": _median([float(r["images_per_s"]) for r in this_run[1:]] or [0.0]),
        "num_workers": plan.workers,
        "use_gpu": plan.use_gpu,
        "gpus_per_worker": plan.gpus,
        "backend": backend,
        "ray": how,
        "ray_startup_s": round(t_ray, 2),
        "fit_wall_s": round(t_fit, 2),
        "checkpoint": str(newest[0][1]) if newest else None,
    }
    if metrics_path:
        write_json(metrics_path, summary)
    return summary


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
    print(f"trained to step {summary['steps']}: loss {summary['final_loss']}, {summary['images_per_s']} images/s, "
          f"Ray start-up {summary['ray_startup_s']} s, fit {summary['fit_wall_s']} s -> {summary['checkpoint']}")
    return summary


if __name__ == "__main__":
    run_cli(main)
