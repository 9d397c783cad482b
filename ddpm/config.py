"""The library's configuration sections: typed, validated, frozen (pydantic) descriptions of the model
(:class:`ModelConfig`, turned into :class:`ddpm.unet.UNetConfig`, the one stored in every checkpoint), the
diffusion process and the sampler.

Every error names the dotted key and what is accepted (``diffusion.timesteps: must be greater than 0, got 0``).
The pipeline's sections (data, train, sample, classifier, evaluate, ray, tracking, figures, sampler_table), the
whole tree and the reading of ``params.yaml`` live in :mod:`tasks.lib.config`, outside the library.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool



class ConfigError(ValueError):
    """Invalid configuration. ``key`` is the dotted key at fault (or the file), ``str(e)`` one readable line."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ModelConfig(_Section):
    ch: int = Field(default=64, gt=0)
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = Field(default=2, gt=0)
    attn_resolutions: tuple[int, ...] = (4,)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    num_groups: int = Field(default=32, gt=0)
    # GroupNorm's epsilon: 1e-6 in the paper's code (the cifar10/lsun256/celebahq256 presets), 1e-5 (torch's default)
    # in the digits demo and in every checkpoint stored before the key existed (ddpm/unet.py UNetConfig.norm_eps).
    norm_eps: float = Field(default=1e-5, gt=0, lt=1)


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


class SamplerConfig(_Section):
    """How :func:`ddpm.samplers.sample` draws an image: Algorithm 2 (``ddpm``, all T steps, ``variance``), DDIM
    (``ddim``, ``steps`` timesteps, ``eta``) or a multistep solver of :mod:`ddpm.solvers` (``steps`` network
    evaluations); DDIM and the solvers place their steps by ``timestep_spacing``. :meth:`kwargs` are that function's
    keyword arguments."""

    sampler: SamplerName = "ddim"
    steps: int = Field(default=100, gt=0)  # network evaluations of DDIM and the solvers; DDPM uses diffusion.timesteps
    eta: float = Field(default=0.0, ge=0)  # DDIM only
    # where DDIM's and the solvers' steps fall (Lin et al. 2024, Table 2); trailing starts at t = T, where x_T is
    # noise. BENCHMARKS.md "Samplers at equal quality" measured it against leading and linspace.
    timestep_spacing: TimestepSpacing = "trailing"
    variance: Literal["fixedlarge", "fixedsmall"] = "fixedlarge"
    clip_denoised: StrictBool = True

    def kwargs(self) -> dict[str, object]:
        return {"sampler": self.sampler, "steps": self.steps, "eta": self.eta,
                "timestep_spacing": self.timestep_spacing, "variance": self.variance,
                "clip_denoised": self.clip_denoised}
