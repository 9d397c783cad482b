"""The library's configuration sections: typed, validated, frozen (pydantic) descriptions of the data, the model,
the diffusion process, training, sampling, the classifier and the evaluation.

Every error names the dotted key and what is accepted (``train.lr: must be greater than 0, got -1``). The
pipeline's own sections (ray, tracking, figures, sampler_table), the whole tree and the reading of ``params.yaml``
live in :mod:`tasks.lib.config`, outside the library.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "image-folder")
# Native (channels, side) of the built-in datasets; image-folder takes both from data.*.
NATIVE_SHAPES = {"digits": (1, 8), "mnist": (1, 28), "fashion-mnist": (1, 28), "cifar10": (3, 32)}


class ConfigError(ValueError):
    """Invalid configuration. ``key`` is the dotted key at fault (or the file), ``str(e)`` one readable line."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


PosInt = Field(gt=0)


class DataConfig(_Section):
    dataset: Literal["digits", "mnist", "fashion-mnist", "cifar10", "image-folder"] = "digits"
    root: str = "data/raw"  # where source files are (or are downloaded to, with download: true)
    download: StrictBool = False
    image_size: Optional[int] = Field(default=None, gt=0)  # null: the dataset's native size
    channels: Optional[Literal[1, 3]] = None  # null: native; image-folder defaults to 3
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)  # for datasets with no official test split
    # false: an i.i.d. holdout, so the FID floor carries the class-count noise a sampler's output has
    stratify_holdout: StrictBool = False
    max_train: Optional[int] = Field(default=None, gt=0)  # cap the training split (quick experiments)
    seed: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the pipeline trains on."""
        c, s = NATIVE_SHAPES.get(self.dataset, (3, None))
        c = self.channels or c
        s = self.image_size or s
        return (c, s, s)


class ModelConfig(_Section):
    ch: int = Field(default=64, gt=0)
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = Field(default=2, gt=0)
    attn_resolutions: tuple[int, ...] = (4,)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    num_groups: int = Field(default=32, gt=0)


class DiffusionConfig(_Section):
    schedule: Literal["linear", "cosine"] = "linear"
    timesteps: int = Field(default=1000, gt=0)  # T; at least 2 (checked with the other sections)
    beta_start: float = Field(default=1e-4, gt=0, lt=1)
    beta_end: float = Field(default=0.02, gt=0, lt=1)
    cosine_s: float = Field(default=0.008, ge=0)
    objective: Literal["eps", "x0", "v"] = "eps"

    def schedule_kwargs(self) -> dict[str, float]:
        if self.schedule == "linear":
            return {"beta_start": self.beta_start, "beta_end": self.beta_end}
        return {"s": self.cosine_s}


class TrainConfig(_Section):
    steps: int = Field(default=2000, gt=0)
    batch_size: int = Field(default=128, gt=0)  # global, split over workers
    lr: float = Field(default=2e-4, gt=0)
    warmup_steps: int = Field(default=0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = Field(default=1.0, ge=0)  # 0 turns clipping off
    ema_decay: float = Field(default=0.9999, ge=0, lt=1)
    random_flip: StrictBool = False
    seed: int = 0
    checkpoint_every: int = Field(default=500, gt=0)
    keep_checkpoints: int = Field(default=3, gt=0)
    log_every: int = Field(default=10, gt=0)
    num_workers: int = Field(default=2, gt=0)
    use_gpu: Union[StrictBool, Literal["auto"]] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast, on GPU only
    max_failures: int = Field(default=3, ge=0)  # Ray restarts after a worker dies
    # speed switches (ddpm/perf.py; defaults from the records in BENCHMARKS.md "Speed defaults"); none changes
    # what is learned beyond float round-off
    channels_last: StrictBool = True  # NHWC memory layout for the network
    compile: StrictBool = False  # torch.compile the network (minutes of compilation on CPU: pays on GPU)
    adam_impl: Literal["auto", "fused", "foreach", "loop"] = "fused"  # fused: one kernel for all params


class SampleConfig(_Section):
    num_samples: int = Field(default=1000, gt=0)
    shard_size: int = Field(default=250, gt=0)
    batch_size: int = Field(default=250, gt=0)
    sampler: Literal["ddpm", "ddim"] = "ddim"
    steps: int = Field(default=100, gt=0)  # DDIM steps; DDPM always uses diffusion.timesteps
    eta: float = Field(default=0.0, ge=0)
    variance: Literal["fixedlarge", "fixedsmall"] = "fixedlarge"
    clip_denoised: StrictBool = True
    use_ema: StrictBool = True
    seed: int = Field(default=0, ge=0)  # sample i uses seed + i
    num_workers: int = Field(default=2, gt=0)
    use_gpu: Union[StrictBool, Literal["auto"]] = "auto"
    channels_last: StrictBool = False  # speed switch (ddpm/perf.py): NHWC memory layout for the network
    compile: StrictBool = False  # speed switch: torch.compile the network (minutes of compilation on CPU)
    # bf16: the network under bf16 autocast on a GPU (the diffusion arithmetic stays float32); ignored on CPU
    precision: Literal["fp32", "bf16"] = "fp32"
    grid_size: int = Field(default=100, gt=0)
    # the grids (training grids in MLflow and samples/grid.png) use seeds grid_seed .. grid_seed+n-1, every run
    grid_seed: int = Field(default=0, ge=0)
    # generate: from noise; img2img: held-out image i noised to t = strength*T, then denoised (seed + i);
    # inpaint: held-out image i with the `mask` region redrawn, the rest kept exactly
    mode: Literal["generate", "img2img", "inpaint"] = "generate"
    strength: float = Field(default=0.5, ge=0, le=1)  # img2img: 0 returns the input, 1 a fresh sample
    # inpaint: the region to fill (1 = known elsewhere; "center": the middle square of half the side)
    mask: Literal["bottom-half", "top-half", "left-half", "right-half", "center"] = "bottom-half"
    jump_length: int = Field(default=1, gt=0)  # inpaint: RePaint resampling, steps per jump back
    jump_n_sample: int = Field(default=1, gt=0)  # inpaint: RePaint resampling, passes per jump; 1: no resampling


class ClassifierConfig(_Section):
    # Defaults reach ~98.5% held-out accuracy on digits in ~5 s of CPU time.
    steps: int = Field(default=250, gt=0)
    batch_size: int = Field(default=128, gt=0)
    lr: float = Field(default=3e-3, gt=0)
    width: int = Field(default=16, gt=0)
    seed: int = 0


class EvaluateConfig(_Section):
    feature_extractor: Literal["auto", "classifier", "inception-v3-compat"] = "auto"
    inception_weights: Optional[str] = None  # path to pt_inception-2015-12-05 weights for offline use
    # SHA-256 the inception_weights file must have: the published weights-inception-2015-12-05-6726825d.pth
    # (byte-identical to pytorch-fid's pt_inception-2015-12-05-6726825d.pth)
    inception_sha256: str = Field(default="6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
                                  pattern=r"^[0-9a-f]{64}$")
    # k > 1: the sample stage draws k * sample.num_samples images (seeds seed .. seed+k*n-1); each metric is
    # measured on k disjoint seed ranges of n and reported per range with mean, std and min
    repeats: int = Field(default=1, gt=0)
    # null: statistics of the dataset's train split (cached in --ref-dir); or a published .npz of (mu, sigma),
    # checked against the .json of provenance beside it when there is one (KID and precision/recall need features)
    reference: Optional[str] = None
    fid: StrictBool = True
    kid: StrictBool = True
    isc: Literal["auto"] | StrictBool = "auto"  # auto: on for RGB datasets
    prc: StrictBool = False
    kid_subset_size: int = Field(default=100, gt=1)
    batch_size: int = Field(default=250, gt=0)
    seed: int = 0
