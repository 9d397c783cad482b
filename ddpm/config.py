"""The library's configuration sections: typed, validated, frozen (pydantic) descriptions of the model
(:class:`ModelConfig`, turned into :class:`ddpm.unet.UNetConfig`, the one stored in every checkpoint), the
diffusion process and the sampler. Their defaults are the project's digits preset (its params.yaml), and every field
carries its identity mark (below).

Every error names the dotted key and what is accepted (``diffusion.timesteps: must be greater than 0, got 0``).
The pipeline's sections (data, train, sample, classifier, evaluate, ray, tracking, figures, sampler_table), the
whole tree and the reading of ``params.yaml`` live in :mod:`tasks.lib.config`, outside the library.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictBool

# What a field is to a run's identity, marked where the field is declared (:func:`result`, :func:`count`,
# :func:`report`, :func:`execution`); every key that identifies a run or a reusable part of it is derived from these
# marks (:meth:`Section.identity`): the train run key, the params hash MLflow finds a run by, the sampling key of a
# shard, MLflow's params and tags.
Identity = Literal["result", "count", "report", "execution"]


def _mark(identity: Identity, when: Optional[Mapping[str, Any]], otherwise: Identity, shown: bool,
          tagged: bool) -> dict[str, Any]:
    extra: dict[str, Any] = {"identity": identity}
    if when:
        extra["when"] = {k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in when.items()}
        extra["otherwise"] = otherwise
    if shown:
        extra["shown"] = True
    if tagged:
        extra["tagged"] = True
    return extra


def result(default: Any, *, when: Optional[Mapping[str, Any]] = None, otherwise: Identity = "execution",
           shown: bool = False, **constraints: Any) -> Any:
    """A field that defines what is computed (the weights, an image of a seed, a score): another value is another
    result, so it is in every key of its section. ``when`` ({sibling field: value or values}) limits that to the
    settings where the field is used; elsewhere it counts as ``otherwise`` (e.g. ``sample.strength`` only in the
    img2img mode). ``shown``: one of the few keys runs are compared by (MLflow's params)."""
    return Field(default, json_schema_extra=_mark("result", when, otherwise, shown, False), **constraints)


def count(default: Any, *, shown: bool = False, **constraints: Any) -> Any:
    """How many of the same computations (samples, measurements): one seed per sample makes each the same whatever
    the count, so the keys of a reusable part (a shard) leave it out, and so does the run's identity: more of them
    continue a run."""
    return Field(default, json_schema_extra=_mark("count", None, "count", shown, False), **constraints)


def report(default: Any, **constraints: Any) -> Any:
    """What a report of the trained model shows (figures, the sampler table, the training grids): no result of the
    run depends on it, so no key holds it."""
    return Field(default, json_schema_extra=_mark("report", None, "report", False, False), **constraints)


def execution(default: Any, *, tagged: bool = False, **constraints: Any) -> Any:
    """Where, how fast, how often it is saved or logged: the same numbers (up to float round-off), so no key holds
    it. ``tagged``: where it ran, kept beside the run (MLflow tags)."""
    return Field(default, json_schema_extra=_mark("execution", None, "execution", False, tagged), **constraints)


class ConfigError(ValueError):
    """Invalid configuration. ``key`` is the dotted key at fault (or the file), ``str(e)`` one readable line."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message

    def __reduce__(self):  # rebuilt from both arguments: Ray pickles a worker's error to its driver
        return type(self), (self.key, self.message)


class Section(BaseModel):
    """A typed, validated, frozen config section whose every field carries its identity mark."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @classmethod
    def mark(cls, name: str) -> dict[str, Any]:
        """The mark of field ``name`` (``identity``, and ``when``/``otherwise``, ``shown``, ``tagged`` if set)."""
        extra = cls.model_fields[name].json_schema_extra
        if not isinstance(extra, dict) or "identity" not in extra:
            raise TypeError(f"{cls.__name__}.{name} has no identity mark (result, count, report or execution)")
        return extra

    def identity_of(self, name: str) -> Identity:
        """Field ``name``'s identity under these settings (its mark's ``when`` resolved against its siblings)."""
        m = self.mark(name)
        when = m.get("when") or {}
        if any(getattr(self, k) not in v for k, v in when.items()):
            return m["otherwise"]
        return m["identity"]

    def identity(self, *kinds: Identity) -> dict[str, Any]:
        """The values (as JSON) of the fields whose identity is one of ``kinds`` (default: ``result``)."""
        kinds = kinds or ("result",)
        names = {n for n in type(self).model_fields if self.identity_of(n) in kinds}
        return self.model_dump(mode="json", include=names)


class ModelConfig(Section):
    """The UNet's architecture (:class:`ddpm.unet.UNetConfig` without the image shape, which is the data's). Its rules
    (positive sizes, divisible levels, attention at a resolution that occurs, groups that divide the channels) are
    checked once, where the UNet config is built from these fields and the shape (``UNetConfig.validate``)."""

    ch: int = result(32, shown=True)
    ch_mult: tuple[int, ...] = result((1, 2, 2))
    num_res_blocks: int = result(1)
    attn_resolutions: tuple[int, ...] = result(())
    dropout: float = result(0.0)
    num_groups: int = result(16)
    # GroupNorm's epsilon: 1e-6 in the paper's code (the cifar10/lsun256/celebahq256 presets), 1e-5 (torch's default)
    # in the digits demo and in every checkpoint stored before the key existed (ddpm/unet.py UNetConfig.norm_eps).
    norm_eps: float = result(1e-5)


class DiffusionConfig(Section):
    schedule: Literal["linear", "cosine"] = result("cosine")
    timesteps: int = result(1000, gt=0)  # T; at least 2 (checked with the other sections)
    beta_start: float = result(1e-4, gt=0, lt=1)
    beta_end: float = result(0.02, gt=0, lt=1)
    cosine_s: float = result(0.008, ge=0)
    objective: Literal["eps", "x0", "v"] = result("eps")

    def schedule_kwargs(self) -> dict[str, float]:
        if self.schedule == "linear":
            return {"beta_start": self.beta_start, "beta_end": self.beta_end}
        return {"s": self.cosine_s}


# The names of :data:`ddpm.samplers.SAMPLERS` and :data:`ddpm.solvers.SPACINGS` (a test keeps them equal).
SamplerName = Literal["ddpm", "ddim", "dpm++2m", "dpm++3m", "dpm++2m-sde", "unipc"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]
# The samplers by name in tables and reports.
SAMPLER_TITLES = {"ddpm": "DDPM (Alg. 2)", "ddim": "DDIM", "dpm++2m": "DPM-Solver++(2M)",
                  "dpm++3m": "DPM-Solver++(3M)", "dpm++2m-sde": "SDE-DPM-Solver++(2M)", "unipc": "UniPC"}


def setting_key(sampler: str, steps: int) -> str:
    """``ddpm1000``, ``ddim10``, ``dpmpp2m_sde20``: a sampler setting as a name for files and metric keys (MLflow
    refuses '+')."""
    return f"{sampler.replace('+', 'p').replace('-', '_')}{steps}"


class SamplerConfig(Section):
    """How :func:`ddpm.samplers.sample` draws an image: Algorithm 2 (``ddpm``, all T steps, ``variance``), DDIM
    (``ddim``, ``steps`` timesteps, ``eta``) or a multistep solver of :mod:`ddpm.solvers` (``steps`` network
    evaluations); DDIM and the solvers place their steps by ``timestep_spacing``. :meth:`kwargs` are that function's
    keyword arguments."""

    sampler: SamplerName = result("dpm++2m-sde", shown=True)
    # network evaluations of DDIM and the solvers; DDPM uses diffusion.timesteps
    steps: int = result(20, gt=0, shown=True)
    eta: float = result(0.0, ge=0)  # DDIM only
    # where DDIM's and the solvers' steps fall (Lin et al. 2024, Table 2); trailing starts at t = T, where x_T is
    # noise. BENCHMARKS.md "Samplers at equal quality" measured it against leading and linspace.
    timestep_spacing: TimestepSpacing = result("trailing")
    variance: Literal["fixedlarge", "fixedsmall"] = result("fixedlarge")
    clip_denoised: StrictBool = result(True)

    def kwargs(self) -> dict[str, object]:
        return {"sampler": self.sampler, "steps": self.steps, "eta": self.eta,
                "timestep_spacing": self.timestep_spacing, "variance": self.variance,
                "clip_denoised": self.clip_denoised}
