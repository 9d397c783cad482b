"""The pipeline's configuration tree: ``params.yaml`` read once into typed, validated, frozen sections.

The library's sections (data, model, diffusion, train, sample, classifier, evaluate) come from
:mod:`ddpm.config`; the pipeline's own (ray, tracking, figures, sampler_table) are here, with the tree that holds
them all and the reading of params files. Every error names the dotted key and what is accepted
(``train.lr: must be greater than 0, got -1``) and is raised before any compute starts. Stages receive the whole
:class:`Config` and read their own section.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import yaml
from pydantic import Field, StrictBool, ValidationError, model_validator

from ddpm.config import (  # noqa: F401  (the library's sections, re-exported: one import for the pipeline)
    DATASETS,
    NATIVE_SHAPES,
    ClassifierConfig,
    ConfigError,
    DataConfig,
    DiffusionConfig,
    EvaluateConfig,
    ModelConfig,
    SampleConfig,
    TrainConfig,
    _Section,
)
from ddpm.unet import UNetConfig, UNetConfigError


class FiguresConfig(_Section):
    """The figures stage (tasks/figures.py); the chains use the sample section's sampler, steps, eta, variance."""

    enabled: StrictBool = False  # false: the stage writes only figures.json saying so
    seeds: int = Field(default=4, gt=0)  # progressive generation: rows (seeds seed, seed+1, ...)
    frames: int = Field(default=10, gt=1)  # progressive generation: evenly spaced timesteps T..0 (columns)
    recon_images: int = Field(default=4, gt=0)  # reconstruction: held-out images (the first ones)
    recon_seeds: int = Field(default=3, gt=0)  # reconstruction: reverse runs per image and t
    recon_fractions: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25, 0.0)  # reconstruction: t = fraction*T, one PNG each
    gif_samples: int = Field(default=16, gt=0)  # animation: samples in the grid
    gif_frames: int = Field(default=20, gt=1)  # animation: frames from noise to samples (the last one held longer)
    seed: int = Field(default=0, ge=0)


class SamplerTableConfig(_Section):
    """The sampler_table stage (tasks/sampler_table.py): FID/KID and wall time per sampler, same seeds each row."""

    enabled: StrictBool = False  # false: the stage writes only sampler_table.json saying so
    num_samples: int = Field(default=200, gt=1)  # per row; seeds seed .. seed+num_samples-1
    ddpm: StrictBool = True  # include Algorithm 2 over all diffusion.timesteps
    ddim_steps: tuple[int, ...] = (10, 20, 50, 100)  # one DDIM (eta=0) row per entry
    batch_size: int = Field(default=100, gt=0)
    seed: int = Field(default=0, ge=0)


class RayConfig(_Section):
    address: Optional[str] = None  # RAY_ADDRESS wins; null starts a local Ray sized to this machine
    num_cpus: Optional[int] = Field(default=None, gt=0)
    object_store_mb: int = Field(default=512, ge=78)
    storage: str = ".ray_results"  # made absolute: Ray workers change directory


class TrackingConfig(_Section):
    """MLflow tracking (the tracking layer, tracking/): one MLflow run per pipeline run, found again by its params hash."""

    enabled: StrictBool = True
    uri: Optional[str] = None  # MLFLOW_TRACKING_URI wins; null: sqlite:///<project>/mlflow.db + <project>/mlruns
    experiment: Optional[str] = None  # null: the dataset name
    grid_every: int = Field(default=500, ge=0)  # EMA sample grid every N training steps and at the end; 0: none
    grid_samples: int = Field(default=16, gt=0)  # the grids use seeds sample.grid_seed .. +grid_samples-1
    grid_steps: int = Field(default=20, gt=0)  # DDIM steps of the training grids (at most diffusion.timesteps)
    register_model: Optional[str] = None  # register the final EMA UNet under this model name
    system_metrics: StrictBool = True  # CPU/GPU/memory/disk metrics while training


class Config(_Section):
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
        try:
            self.unet_config()
        except UNetConfigError as e:
            key = "data.image_size" if e.field == "image_size" else f"model.{e.field}"
            raise ValueError(f"{key}: {str(e).split(': ', 1)[1]}") from None
        s = self.sample
        if s.sampler == "ddim" and s.steps > self.diffusion.timesteps:
            raise ValueError(f"sample.steps: {s.steps} DDIM steps exceed diffusion.timesteps {self.diffusion.timesteps}")
        f, st, T = self.figures, self.sampler_table, self.diffusion.timesteps
        if any(not 0 <= x <= 1 for x in f.recon_fractions) or not f.recon_fractions:
            raise ValueError(f"figures.recon_fractions: fractions of T in [0, 1], got {list(f.recon_fractions)}")
        if not st.ddim_steps and not st.ddpm:
            raise ValueError("sampler_table.ddim_steps: empty and sampler_table.ddpm is false; the table has no row")
        if st.enabled and any(not 1 <= n <= T for n in st.ddim_steps):
            raise ValueError(f"sampler_table.ddim_steps: each must be between 1 and diffusion.timesteps {T}, "
                             f"got {list(st.ddim_steps)}")
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
        c, size, _ = self.data.shape
        m = self.model
        return UNetConfig(c, size, m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.dropout, m.num_groups)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def section_hash(self, *sections: str) -> str:
        """SHA-256 of the named sections' (or dotted keys', ``sample.num_samples``) resolved values.

        What a stage's cache key depends on; the names are those of the stage's ``params`` in dvc.yaml.
        """
        d = self.to_dict()

        def value(name: str) -> Any:
            v: Any = d
            for part in name.split("."):
                v = v[part]
            return v

        blob = json.dumps({s: value(s) for s in sections}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


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


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any] | Iterable[str] | None) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted-key overrides applied (``{"train.steps": 10}`` or ``["train.steps=10"]``)."""
    out = json.loads(json.dumps(dict(raw or {})))
    if not overrides:
        return out
    items = overrides.items() if isinstance(overrides, Mapping) else (parse_override(o) for o in overrides)
    for key, value in items:
        parts = key.split(".")
        if len(parts) != 2 or parts[0] not in _SECTIONS:
            raise ConfigError(key, f"overrides take section.key with a section among {', '.join(_SECTIONS)}")
        section, name = parts
        if name not in _SECTIONS[section].model_fields:
            known = ", ".join(_SECTIONS[section].model_fields)
            raise ConfigError(key, f"unknown key; known keys of {section}: {known}")
        sec = out.setdefault(section, {})
        if not isinstance(sec, dict):
            raise ConfigError(section, f"expected a mapping, got {type(sec).__name__}")
        sec[name] = value
    return out


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
                          "diffusion, train, ...), e.g. a copy of configs/digits.yaml")
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
