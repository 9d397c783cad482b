"""The pipeline's configuration tree: ``params.yaml`` read once into typed, validated, frozen sections.

The library's sections (model, diffusion, and the sampler settings the sample section extends) come from
:mod:`ddpm.config`; the pipeline's own (data, train, sample, classifier, evaluate, ray, tracking, figures,
sampler_table) are here, with the tree that holds them all and the reading of params files. Every error names the dotted key and what is accepted
(``train.lr: must be greater than 0, got -1``) and is raised before any compute starts. Stages receive the whole
:class:`Config` and read their own section; Ray workers receive it as it is (it pickles).

The classes' defaults are the digits preset, ``params.yaml``, key for key (tests/test_config.py). Every field is marked
where it is declared as ``result``, ``count``, ``report`` or ``execution`` (:mod:`ddpm.config`): the keys that
identify a run (tasks/lib/runkey.py, the params hash of tracking/run.py, the sampling key of tasks/lib/sampling.py)
are derived from those marks by :meth:`Config.identity`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Optional, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, StrictBool, ValidationError, field_validator, model_validator

from ddpm.config import (  # noqa: F401  (the library's sections, re-exported: one import for the pipeline)
    ConfigError,
    DiffusionConfig,
    ModelConfig,
    SamplerConfig,
    SamplerName,
    Section,
    count,
    execution,
    report,
    result,
)
from ddpm.unet_config import UNetConfig, UNetConfigError


SOLVER_NAMES = tuple(n for n in get_args(SamplerName) if n not in ("ddpm", "ddim"))
DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "image-folder")
# ray.storage: the schemes pyarrow 25's FileSystem.from_uri opens (its "mock" and "local" left out: not for a cluster);
# a URI of the bucketed ones names its bucket (container) first. tasks/lib/storage.py reaches the storage.
STORAGE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs", "file")
STORAGE_BUCKETED = ("s3", "gs", "gcs", "abfs", "abfss")
STORAGE_ACCEPTED = ("a local or NFS path, or a URI of a file system pyarrow opens "
                    "(s3://bucket/prefix, gs://, abfs://, hdfs://, file://)")
# Native (channels, side) of the built-in datasets; image-folder takes both from data.*.
NATIVE_SHAPES = {"digits": (1, 8), "mnist": (1, 28), "fashion-mnist": (1, 28), "cifar10": (3, 32)}


class DataConfig(Section):
    dataset: Literal["digits", "mnist", "fashion-mnist", "cifar10", "image-folder"] = result("digits", shown=True)
    root: str = execution("data/raw", tagged=True)  # where source files are (or are downloaded to, with download: true)
    download: StrictBool = execution(False)
    image_size: Optional[int] = result(None, gt=0)  # null: the dataset's native size
    channels: Optional[Literal[1, 3]] = result(None)  # null: native; image-folder defaults to 3
    holdout_fraction: float = result(0.2, gt=0, lt=1)  # for datasets with no official test split
    # false: an i.i.d. holdout, so the FID floor carries the class-count noise a sampler's output has
    stratify_holdout: StrictBool = result(False)
    max_train: Optional[int] = result(None, gt=0)  # cap the training split (quick experiments)
    seed: int = result(0)
    # image-folder: an unreadable image fails the fetch (error, naming the files) or is left out and counted in
    # dataset.json's "skipped" (skip); never dropped silently
    bad_images: Literal["error", "skip"] = result("error")
    ingest_workers: Optional[int] = execution(None, gt=0)  # image-folder decode processes; null: all cores
    # images per Parquet shard (null: about 64 MiB each); the shards' row groups set the order training reads
    shard_images: Optional[int] = result(None, gt=0)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the pipeline trains on."""
        c, s = NATIVE_SHAPES.get(self.dataset, (3, None))
        c = self.channels or c
        s = self.image_size or s
        return (c, s, s)


class TrainConfig(Section):
    # A longer run continues a shorter one (its checkpoints resume), except under the cosine schedule, whose decay
    # is laid over train.steps: there a longer run is another curve from step 0.
    steps: int = result(1500, gt=0, when={"lr_schedule": "cosine"}, otherwise="count", shown=True)
    batch_size: int = result(128, gt=0)  # global, split over workers
    lr: float = result(0.002, gt=0, shown=True)
    warmup_steps: int = result(100, ge=0)
    lr_schedule: Literal["constant", "cosine"] = result("cosine")
    grad_clip: float = result(1.0, ge=0)  # 0 turns clipping off
    ema_decay: float = result(0.995, ge=0, lt=1)
    random_flip: StrictBool = result(False)
    seed: int = result(0)
    # rows are shuffled within windows of this many MiB of pixels per worker (the whole part when it fits: a full
    # shuffle); the row groups' order is drawn anew each epoch (tasks/lib/shards.py TrainStream)
    shuffle_buffer_mb: int = result(64, gt=0)
    # shards: each worker reads its part of the shards itself (exact resume); ray-data: Ray Data reads them
    # (read tasks anywhere in the cluster, Ray Train's get_dataset_shard) and a resume skips batches of a new order
    loader: Literal["shards", "ray-data"] = result("shards")
    checkpoint_every: int = execution(500, gt=0)
    keep_checkpoints: int = execution(3, gt=0)
    log_every: int = execution(10, gt=0)
    # how the work is spread (the batch is split over the workers): a checkpoint resumes across it
    num_workers: int = execution(1, gt=0, tagged=True)
    use_gpu: Union[StrictBool, Literal["auto"]] = execution("auto", tagged=True)
    # the share of a GPU each worker takes: 1 (one per GPU, DDP over NCCL); 0.5 puts two workers on one GPU (NCCL
    # refuses two ranks on one device, so a fraction below 1 runs DDP over gloo): the multi-worker path on one GPU
    gpus_per_worker: float = execution(1.0)
    precision: Literal["fp32", "bf16"] = result("fp32")  # bf16 autocast, on GPU only
    max_failures: int = execution(3, ge=0)  # Ray restarts after a worker dies
    # speed switches (ddpm/perf.py; defaults from the records in BENCHMARKS.md "Speed defaults"); none changes
    # what is learned beyond float round-off
    channels_last: StrictBool = execution(True)  # NHWC memory layout for the network
    compile: StrictBool = execution(False, tagged=True)  # torch.compile the network (minutes of compilation on CPU)
    adam_impl: Literal["auto", "fused", "foreach", "loop"] = execution("fused")  # fused: one kernel for all params
    # A published model instead of training: a diffusers DDPMPipeline folder (docs/diffusers.md) that the train stage
    # imports as the run's checkpoint; the later stages read it as any checkpoint. Its network and diffusion come
    # from the folder (the checkpoint stores them), so the model and diffusion sections are not used, except the data
    # shape and diffusion.timesteps, which must be the model's (tasks/lib/inputs.py checks before any stage runs).
    pretrained: Optional[str] = result(None)

    @field_validator("pretrained")
    @classmethod
    def _a_folder_or_null(cls, v: Optional[str]) -> Optional[str]:
        """The value's form only (no I/O: a missing folder is an input error, tasks/lib/inputs.py)."""
        if v is not None and not v.strip():
            raise ValueError("train.pretrained: empty; null (train the model) or a diffusers DDPMPipeline folder")
        return v

    @field_validator("gpus_per_worker")
    @classmethod
    def _share_of_one_gpu(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"train.gpus_per_worker: a share of one GPU in (0, 1], e.g. 0.5 for two workers per GPU "
                             f"(over gloo), got {v:g}")
        return v


class SampleConfig(SamplerConfig):
    """The sample stage: the library's sampler settings (:class:`ddpm.config.SamplerConfig`) and how many samples,
    on which workers, from which weights, in which mode."""

    num_samples: int = count(360, gt=0)
    # shards and batches: how the seeds are split (another batch split agrees within float round-off)
    shard_size: int = execution(90, gt=0)
    batch_size: int = execution(90, gt=0)
    use_ema: StrictBool = result(True)
    seed: int = result(0, ge=0)  # sample i uses seed + i
    num_workers: int = execution(2, gt=0, tagged=True)
    use_gpu: Union[StrictBool, Literal["auto"]] = execution("auto", tagged=True)
    channels_last: StrictBool = execution(False)  # speed switch (ddpm/perf.py): NHWC memory layout for the network
    compile: StrictBool = execution(False)  # speed switch: torch.compile the network (minutes of compilation on CPU)
    # bf16: the network under bf16 autocast on a GPU (the diffusion arithmetic stays float32); ignored on CPU
    precision: Literal["fp32", "bf16"] = result("fp32")
    grid_size: int = report(100, gt=0)
    # the grids (training grids in MLflow and samples/grid.png) use seeds grid_seed .. grid_seed+n-1, every run
    grid_seed: int = report(0, ge=0)
    # generate: from noise; img2img: held-out image i noised to t = strength*T, then denoised (seed + i);
    # inpaint: held-out image i with the `mask` region redrawn, the rest kept exactly
    mode: Literal["generate", "img2img", "inpaint"] = result("generate")
    # img2img: 0 returns the input, 1 a fresh sample
    strength: float = result(0.5, ge=0, le=1, when={"mode": "img2img"})
    # inpaint: the region to fill (1 = known elsewhere; "center": the middle square of half the side)
    mask: Literal["bottom-half", "top-half", "left-half", "right-half", "center"] = result(
        "bottom-half", when={"mode": "inpaint"})
    # inpaint: RePaint resampling, steps per jump back and passes per jump (1: no resampling)
    jump_length: int = result(1, gt=0, when={"mode": "inpaint"})
    jump_n_sample: int = result(1, gt=0, when={"mode": "inpaint"})


class ClassifierConfig(Section):
    """The classifier whose features measure grayscale datasets: every setting changes those features."""

    # Defaults reach ~98.5% held-out accuracy on digits in ~5 s of CPU time.
    steps: int = result(250, gt=0)
    batch_size: int = result(128, gt=0)
    lr: float = result(3e-3, gt=0)
    width: int = result(16, gt=0)
    seed: int = result(0)


class EvaluateConfig(Section):
    feature_extractor: Literal["auto", "classifier", "inception-v3-compat"] = result("auto")
    # path to pt_inception-2015-12-05 weights for offline use; what they are is inception_sha256
    inception_weights: Optional[str] = execution(None)
    # SHA-256 the inception_weights file must have: the published weights-inception-2015-12-05-6726825d.pth
    # (byte-identical to pytorch-fid's pt_inception-2015-12-05-6726825d.pth)
    inception_sha256: str = result("6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
                                   pattern=r"^[0-9a-f]{64}$")
    # k > 1: the sample stage draws k * sample.num_samples images (seeds seed .. seed+k*n-1); each metric is
    # measured on k disjoint seed ranges of n and reported per range with mean, std and min
    repeats: int = count(3, gt=0)
    # null: statistics of the dataset's train split (cached in --ref-dir); or a published .npz of (mu, sigma),
    # checked against the .json of provenance beside it when there is one (KID and precision/recall need features)
    reference: Optional[str] = result(None)
    fid: StrictBool = result(True)
    kid: StrictBool = result(True)
    isc: Literal["auto"] | StrictBool = result("auto")  # auto: on for RGB datasets
    prc: StrictBool = result(False)
    kid_subset_size: int = result(100, gt=1)
    batch_size: int = execution(250, gt=0)
    seed: int = result(0)


class FiguresConfig(Section):
    """The figures stage (tasks/figures.py): a report of the trained model, whose chains use the sample section's
    sampler, steps, eta, variance."""

    enabled: StrictBool = report(True)  # false: the stage writes only figures.json saying so
    seeds: int = report(4, gt=0)  # progressive generation: rows (seeds seed, seed+1, ...)
    frames: int = report(10, gt=1)  # progressive generation: evenly spaced timesteps T..0 (columns)
    recon_images: int = report(4, gt=0)  # reconstruction: held-out images (the first ones)
    recon_seeds: int = report(3, gt=0)  # reconstruction: reverse runs per image and t
    # reconstruction: t = fraction*T, one PNG each
    recon_fractions: tuple[float, ...] = report((1.0, 0.75, 0.5, 0.25, 0.0))
    gif_samples: int = report(16, gt=0)  # animation: samples in the grid
    gif_frames: int = report(20, gt=1)  # animation: frames from noise to samples (the last one held longer)
    seed: int = report(0, ge=0)


class SamplerTableConfig(Section):
    """The sampler_table stage (tasks/sampler_table.py): a report of the trained model, FID/KID and wall time per
    sampler, same seeds each row."""

    enabled: StrictBool = report(True)  # false: the stage writes only sampler_table.json saying so
    num_samples: int = report(600, gt=1)  # per row; seeds seed .. seed+num_samples-1
    # include Algorithm 2 over all diffusion.timesteps: the reference of "equal quality"
    ddpm: StrictBool = report(True)
    ddim_steps: tuple[int, ...] = report((10, 20, 50))  # one DDIM (eta=0) row per entry
    # multistep solvers (ddpm/solvers.py) with rows at each of solver_steps network evaluations
    solvers: tuple[SamplerName, ...] = report(("dpm++2m", "unipc", "dpm++2m-sde"))
    solver_steps: tuple[int, ...] = report((5, 10, 20, 50))
    batch_size: int = report(300, gt=0)
    seed: int = report(0, ge=0)
    # the noise: FID of every row on this many resamplings of the seeds (the same for every row); 0: not stated
    bootstrap: int = report(200, ge=0)
    tolerance: float = report(0.1, gt=0)  # equal quality: FID within this fraction of DDPM's (or its noise)


class RayConfig(Section):
    address: Optional[str] = execution(None, tagged=True)  # RAY_ADDRESS wins; null starts a local Ray on this machine
    num_cpus: Optional[int] = execution(None, gt=0, tagged=True)
    object_store_mb: int = execution(512, ge=78)
    # Ray Train's run state and checkpoints: a local/NFS path (made absolute: Ray workers change directory) or a URI
    # pyarrow opens (s3://bucket/prefix, gs://...): tasks/lib/storage.py, docs/scaling.md
    storage: str = execution(".ray_results")

    @field_validator("storage")
    @classmethod
    def _storage_form(cls, v: str) -> str:
        """The value's form only (no I/O): a non-empty path, or a URI of a known scheme naming its bucket."""
        if not v.strip():
            raise ValueError(f"ray.storage: empty; accepted: {STORAGE_ACCEPTED}")
        if "://" not in v:
            return v
        scheme, _, rest = v.partition("://")
        if scheme.lower() not in STORAGE_SCHEMES:
            raise ValueError(f"ray.storage: {v}: unknown scheme '{scheme}://'; accepted: {STORAGE_ACCEPTED}")
        if scheme.lower() in STORAGE_BUCKETED and not rest.split("/", 1)[0]:
            raise ValueError(f"ray.storage: {v}: no bucket named; accepted: {STORAGE_ACCEPTED}")
        return v


class TrackingConfig(Section):
    """MLflow tracking (the tracking layer, tracking/): one MLflow run per pipeline run, found again by its params
    hash."""

    enabled: StrictBool = execution(True)
    uri: Optional[str] = execution(None)  # MLFLOW_TRACKING_URI wins; null: sqlite:///<project>/mlflow.db + mlruns
    experiment: Optional[str] = execution(None)  # null: the dataset name
    grid_every: int = report(100, ge=0)  # EMA sample grid every N training steps and at the end; 0: none
    grid_samples: int = report(16, gt=0)  # the grids use seeds sample.grid_seed .. +grid_samples-1
    # the training grids' sampler and its network evaluations (sample.timestep_spacing); the cheapest setting
    # that held quality in BENCHMARKS.md "Samplers at equal quality"
    grid_sampler: SamplerName = report("dpm++2m-sde")
    grid_steps: int = report(10, gt=0)  # at most diffusion.timesteps; ddpm ignores it
    register_model: Optional[str] = execution(None)  # register the final EMA UNet under this model name
    system_metrics: StrictBool = execution(True)  # CPU/GPU/memory/disk metrics while training


class Config(BaseModel):
    """The whole params tree, one frozen section per key of params.yaml; Ray pickles it to the workers as it is."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()
    figures: FiguresConfig = FiguresConfig()
    sampler_table: SamplerTableConfig = SamplerTableConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        d = self.data
        if d.dataset == "image-folder" and d.image_size is None:
            raise ValueError("data.image_size: image-folder needs an image size (the side length to crop to)")
        if self.diffusion.schedule == "linear" and self.diffusion.beta_start > self.diffusion.beta_end:
            raise ValueError(
                f"diffusion.beta_start: {self.diffusion.beta_start} exceeds diffusion.beta_end {self.diffusion.beta_end}"
            )
        if self.diffusion.timesteps < 2:
            raise ValueError(f"diffusion.timesteps: must be at least 2, got {self.diffusion.timesteps}; "
                             "the paper uses T = 1000")
        t = self.train
        if t.batch_size % t.num_workers:
            raise ValueError(f"train.batch_size: {t.batch_size} is not divisible by train.num_workers {t.num_workers}; "
                             "use a multiple of the worker count (the batch is split evenly over the workers)")
        try:  # the UNet's rules live in one place, UNetConfig.validate: its field named as the key a user sets
            self.unet_config()
        except UNetConfigError as e:
            key = "data.image_size" if e.field == "image_size" else f"model.{e.field}"
            raise ValueError(f"{key}: {str(e).split(': ', 1)[1]}") from None
        s = self.sample
        if s.sampler != "ddpm" and s.steps > self.diffusion.timesteps:
            raise ValueError(f"sample.steps: {s.steps} {s.sampler} steps exceed diffusion.timesteps "
                             f"{self.diffusion.timesteps}")
        if s.mode == "inpaint" and s.sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sample.sampler: inpaint accepts ddpm or ddim, got {s.sampler} (a multistep solver: the "
                             "known pixels re-imposed after every step would invalidate its history)")
        f, st, T = self.figures, self.sampler_table, self.diffusion.timesteps
        if any(not 0 <= x <= 1 for x in f.recon_fractions) or not f.recon_fractions:
            raise ValueError(f"figures.recon_fractions: fractions of T in [0, 1], got {list(f.recon_fractions)}")
        if not st.ddim_steps and not st.ddpm and not (st.solvers and st.solver_steps):
            raise ValueError("sampler_table.ddim_steps: empty, sampler_table.ddpm false and no solver rows; the table "
                             "has no row")
        if st.enabled and any(not 1 <= n <= T for n in st.ddim_steps):
            raise ValueError(f"sampler_table.ddim_steps: each must be between 1 and diffusion.timesteps {T}, "
                             f"got {list(st.ddim_steps)}")
        if st.enabled and any(n not in SOLVER_NAMES for n in st.solvers):
            raise ValueError(f"sampler_table.solvers: each must be one of {', '.join(SOLVER_NAMES)} (DDPM and DDIM "
                             f"rows are sampler_table.ddpm and ddim_steps), got {list(st.solvers)}")
        if st.enabled and any(not 1 <= n <= T for n in st.solver_steps):
            raise ValueError(f"sampler_table.solver_steps: each must be between 1 and diffusion.timesteps {T}, "
                             f"got {list(st.solver_steps)}")
        if st.enabled and self.evaluate.kid and self.evaluate.kid_subset_size > st.num_samples:
            raise ValueError(f"sampler_table.num_samples: {st.num_samples} is below evaluate.kid_subset_size "
                             f"{self.evaluate.kid_subset_size}; KID needs at least that many samples")
        if self.evaluate.kid and self.evaluate.kid_subset_size > s.num_samples:
            raise ValueError(
                f"evaluate.kid_subset_size: {self.evaluate.kid_subset_size} exceeds sample.num_samples "
                f"{s.num_samples}; KID needs at least that many samples"
            )
        return self

    def unet_config(self) -> UNetConfig:
        """The UNet of these params: the model section and the data's image shape (validated as it is built)."""
        c, size, _ = self.data.shape
        m = self.model
        return UNetConfig(c, size, m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.dropout, m.num_groups,
                          m.norm_eps)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as JSON values: what a run writes beside its outputs and MLflow keeps."""
        return self.model_dump(mode="json")

    def sections(self) -> dict[str, Section]:
        return {name: getattr(self, name) for name in type(self).model_fields}

    def identity(self, *kinds: str) -> dict[str, dict[str, Any]]:
        """{section: its fields of identity ``kinds`` (default ``result``)} over the sections that have any: what
        makes two runs the same run (:meth:`ddpm.config.Section.identity`)."""
        found = {name: sec.identity(*kinds) for name, sec in self.sections().items()}
        return {name: values for name, values in found.items() if values}


def digest(obj: Any) -> str:
    """SHA-256 of ``obj`` as canonical JSON (sorted keys): the hash of every key derived from the identity marks."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _error_key(loc: tuple) -> str:
    """Dotted key of a pydantic error location, without the union/literal branch names pydantic adds."""
    parts: list[str] = []
    model: Any = Config
    for p in loc:
        fields = getattr(model, "model_fields", None)
        if fields is not None and p in fields:
            parts.append(str(p))
            model = fields[p].annotation
        elif isinstance(p, int):
            parts.append(str(p))
        elif fields is not None:  # an unknown key (extra_forbidden) is still the key at fault
            parts.append(str(p))
            break
    return ".".join(parts)


def _format_errors(errors: list[Mapping[str, Any]]) -> tuple[str, str]:
    """One line for the first key at fault, merging the branches of a union (``true, false or 'auto'``)."""
    first = errors[0]
    key = _error_key(first["loc"])
    if first["type"] == "extra_forbidden":
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        section = _SECTIONS.get(parent, Config) if parent else Config
        return key, f"unknown key; known keys{' of ' + parent if parent else ''}: {', '.join(section.model_fields)}"
    if first["type"] == "value_error":  # cross checks already say "dotted.key: message"
        text = first["msg"].removeprefix("Value error, ")
        head, _, rest = text.partition(": ")
        return (head, rest) if rest and head.count(".") == 1 else (key or "params", text)
    same = [e for e in errors if _error_key(e["loc"]) == key]
    msgs = []
    for e in same:
        m = e["msg"][0].lower() + e["msg"][1:]
        if m not in msgs:
            msgs.append(m)
    return key, f"{' or '.join(msgs)}, got {first.get('input')!r}"


_SECTIONS = {name: f.annotation for name, f in Config.model_fields.items()}


def from_dict(raw: Mapping[str, Any] | None) -> Config:
    """Validate a plain mapping (as read from YAML) into a :class:`Config`; raise :class:`ConfigError`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("params", f"expected a mapping of sections ({', '.join(_SECTIONS)}), got {type(raw).__name__}")
    try:
        return Config.model_validate(dict(raw))
    except ValidationError as e:
        key, msg = _format_errors(e.errors())
        raise ConfigError(key, msg) from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-4"`` -> ``("train.lr", 1e-4)``; the value is read as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigError(text, "an override must look like section.key=value")
    key, value = text.split("=", 1)
    key = key.strip()
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    # YAML 1.1 reads "1e-4" as a string; accept the scientific notation users type.
    if isinstance(parsed, str):
        try:
            parsed = float(parsed) if any(ch in parsed for ch in "eE.") else parsed
        except ValueError:
            pass
    return key, parsed


def _split_key(key: str) -> tuple[str, str]:
    """``"train.lr"`` -> ``("train", "lr")``, checked against the sections and their keys."""
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in _SECTIONS:
        raise ConfigError(key, f"overrides take section.key with a section among {', '.join(_SECTIONS)}")
    section, name = parts
    if name not in _SECTIONS[section].model_fields:
        known = ", ".join(_SECTIONS[section].model_fields)
        raise ConfigError(key, f"unknown key; known keys of {section}: {known}")
    return section, name


def _items(overrides: Mapping[str, Any] | Iterable[str]) -> Iterable[tuple[str, Any]]:
    return overrides.items() if isinstance(overrides, Mapping) else (parse_override(o) for o in overrides)


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any] | Iterable[str] | None) -> dict[str, Any]:
    """Return a copy of ``raw`` (as read from YAML) with dotted-key overrides applied (``{"train.steps": 10}`` or
    ``["train.steps=10"]``); ``raw`` itself is left as it was."""
    out = {name: dict(sec) if isinstance(sec, Mapping) else sec for name, sec in (raw or {}).items()}
    for key, value in _items(overrides or ()):
        section, name = _split_key(key)
        sec = out.setdefault(section, {})
        if not isinstance(sec, dict):
            raise ConfigError(section, f"expected a mapping, got {type(sec).__name__}")
        sec[name] = value
    return out


def override(cfg: Config, overrides: Mapping[str, Any] | Iterable[str]) -> Config:
    """``cfg`` with dotted-key overrides, validated again with every cross check: a new frozen :class:`Config`. The
    sections that do not change are carried over as they are. Raises :class:`ConfigError`."""
    changed: dict[str, dict[str, Any]] = {}
    for key, value in _items(overrides):
        section, name = _split_key(key)
        changed.setdefault(section, dict(getattr(cfg, section)))[name] = value
    try:
        return Config.model_validate({**cfg.sections(), **changed})
    except ValidationError as e:
        key, msg = _format_errors(e.errors())
        raise ConfigError(key, msg) from None


def read_yaml(path: os.PathLike | str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(str(path), f"not valid YAML{where}") from None
    if raw is None or raw == {}:
        # An empty file would silently run every stage on the built-in defaults, which are no preset.
        raise ConfigError(str(path), "the params file is empty; expected a mapping of sections (data, model, "
                          "diffusion, train, ...), e.g. a copy of params.yaml")
    if not isinstance(raw, dict):
        raise ConfigError(str(path), f"expected a mapping of sections (data, model, diffusion, train, ...), got "
                          f"{type(raw).__name__}")
    return raw


def load_config(
    path: os.PathLike | str | None = "params.yaml",
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
) -> Config:
    """Read ``path`` (None: defaults only), apply dotted overrides, validate. Raises :class:`ConfigError`."""
    raw = read_yaml(path) if path is not None else {}
    return from_dict(apply_overrides(raw, overrides))


def write_resolved(cfg: Config, folder: os.PathLike | str, name: str = "config.json") -> Path:
    """Write the resolved config beside a stage's outputs (atomically): ``<folder>/<name>``."""
    from ddpm.checkpoint import atomic_write_bytes

    path = Path(folder) / name
    atomic_write_bytes(path, lambda f: f.write(json.dumps(cfg.to_dict(), indent=2, sort_keys=True).encode() + b"\n"))
    return path
