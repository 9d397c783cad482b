"""Gaussian diffusion (Ho et al. 2020): forward process, posterior, L_simple and one reverse step.

Timesteps are 0-indexed LongTensors of shape [B] with values in {0, ..., T-1}, as in the paper's code and
diffusers; the paper's t is ``index + 1``. Schedules are kept in float64 and read through :func:`extract`,
which hands back float32 values broadcastable against a [B, C, H, W] batch.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable, Optional

import torch
import torch.nn.functional as F

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# callback(step_index, t, x_t, pred_x0): called by every sampler after each reverse step, e.g. to record the chain.
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


class Objective(str, Enum):
    """What the network predicts. The paper's choice is ``eps`` (L_simple, Algorithm 1)."""

    EPS = "eps"
    X0 = "x0"
    V = "v"  # Salimans & Ho 2022: v = sqrt(abar) * eps - sqrt(1 - abar) * x0


class Variance(str, Enum):
    """The reverse-process variance sigma_t^2 (Sec. 3.2): beta_t ("fixedlarge") or beta-tilde_t ("fixedsmall")."""

    FIXED_LARGE = "fixedlarge"
    FIXED_SMALL = "fixedsmall"


def _enum(cls, value, what: str):
    try:
        return cls(value)
    except ValueError:
        known = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"unknown {what} {value!r}; known: {known}") from None


def extract(arr: torch.Tensor, t: torch.Tensor, shape: torch.Size | tuple) -> torch.Tensor:
    """Gather ``arr[t]`` for a batch of timesteps and reshape to [B, 1, ..., 1] to broadcast against ``shape``."""
    out = arr.to(t.device)[t]
    return out.reshape(t.shape[0], *([1] * (len(shape) - 1)))


class GaussianDiffusion:
    """The fixed forward process q and the Gaussian reverse-step math around a noise-prediction network.

    Args:
        betas: [T] float64 variance schedule (see :func:`ddpm.schedules.make_betas`).
        objective: what the network predicts, ``"eps"`` (the paper), ``"x0"`` or ``"v"``.
    """

    def __init__(self, betas: torch.Tensor, objective: str | Objective = Objective.EPS):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie in (0, 1)")
        self.objective = _enum(Objective, objective, "objective")
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])

        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod_prev = alphas_cumprod_prev
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt()
        self.one_minus_alphas_cumprod = 1.0 - alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = self.one_minus_alphas_cumprod.sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / alphas_cumprod - 1.0).sqrt()

        # Eq. 7: beta-tilde_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t, and the mean's two coefficients.
        self.posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # beta-tilde_1 is 0, so its log is clipped to beta-tilde_2, as in the paper's code.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod)

        # sigma_t^2 = beta_t ("fixedlarge"); its index-0 value is set to beta-tilde_2 like the paper's code, so
        # the log stays finite. Index 0 never adds noise either way.
        self._large_variance = torch.cat([self.posterior_variance[1:2], betas[1:]])
        self._f32: dict[tuple[str, torch.device], torch.Tensor] = {}

    # -- schedule access -------------------------------------------------------------------------------------
    def _coef(self, name: str, t: torch.Tensor, shape) -> torch.Tensor:
        """float32 copy of a float64 schedule on ``t``'s device, made once per device, gathered at ``t``."""
        key = (name, t.device)
        arr = self._f32.get(key)
        if arr is None:
            arr = self._f32[key] = getattr(self, name).to(device=t.device, dtype=torch.float32)
        return extract(arr, t, shape)

    def _check_t(self, t: torch.Tensor, batch: int) -> None:
        if t.dtype != torch.long or t.shape != (batch,):
            raise ValueError(f"t must be a LongTensor of shape [{batch}], got {t.dtype} {tuple(t.shape)}")

    # -- forward process ------------------------------------------------------------------------------------
    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0) (Eq. 4)."""
        mean = self._coef("sqrt_alphas_cumprod", t, x0.shape) * x0
        # Not 1 - float32(abar): near t=0 that cancellation loses ~3 of float32's 7 digits.
        var = self._coef("one_minus_alphas_cumprod", t, x0.shape)
        return mean, var, torch.log(var)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Eq. 4). Shapes [B, C, H, W]."""
        self._check_t(t, x0.shape[0])
        if noise is None:
            noise = torch.randn_like(x0)
        return (
            self._coef("sqrt_alphas_cumprod", t, x0.shape) * x0
            + self._coef("sqrt_one_minus_alphas_cumprod", t, x0.shape) * noise
        )

    def q_posterior_mean_variance(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean, variance beta-tilde_t and clipped log-variance of q(x_{t-1} | x_t, x_0) (Eqs. 6-7)."""
        mean = self._coef("posterior_mean_coef1", t, xt.shape) * x0 + self._coef("posterior_mean_coef2", t, xt.shape) * xt
        var = self._coef("posterior_variance", t, xt.shape)
        log_var = self._coef("posterior_log_variance_clipped", t, xt.shape)
        return mean, var, log_var

    # -- conversions between parameterisations --------------------------------------------------------------
    def predict_x0_from_eps(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), from Eq. 4."""
        return (
            self._coef("sqrt_recip_alphas_cumprod", t, xt.shape) * xt
            - self._coef("sqrt_recipm1_alphas_cumprod", t, xt.shape) * eps
        )

    def predict_eps_from_x0(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return (self._coef("sqrt_recip_alphas_cumprod", t, xt.shape) * xt - x0) / self._coef(
            "sqrt_recipm1_alphas_cumprod", t, xt.shape
        )

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (
            self._coef("sqrt_alphas_cumprod", t, x0.shape) * noise
            - self._coef("sqrt_one_minus_alphas_cumprod", t, x0.shape) * x0
        )

    def x0_from_output(self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                       clip_denoised: bool = True) -> torch.Tensor:
        """The x_0 that the network's output ``out`` (eps, x0 or v, by ``objective``) implies at ``x_t``; clipped to
        [-1, 1] when ``clip_denoised``. [B, C, H, W]."""
        if self.objective is Objective.EPS:
            x0 = self.predict_x0_from_eps(xt, t, out)
        elif self.objective is Objective.X0:
            x0 = out
        else:  # v = sqrt(abar) eps - sqrt(1 - abar) x0, so x0 = sqrt(abar) x_t - sqrt(1 - abar) v
            x0 = self._coef("sqrt_alphas_cumprod", t, xt.shape) * xt - self._coef(
                "sqrt_one_minus_alphas_cumprod", t, xt.shape
            ) * out
        return x0.clamp(-1.0, 1.0) if clip_denoised else x0

    def model_predictions(self, model: Model, xt: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True):
        """Run the network once and return ``(eps, x0)``, both consistent with ``x_t``.

        With ``clip_denoised`` the predicted x_0 is clipped to [-1, 1] and eps recomputed from it, so that the
        ancestral and DDIM updates see the same pair.
        """
        out = model(xt, t)
        x0 = self.x0_from_output(out, xt, t, clip_denoised)
        if self.objective is Objective.EPS and not clip_denoised:
            eps = out
        else:
            eps = self.predict_eps_from_x0(xt, t, x0)
        return eps, x0

    # -- training ---------------------------------------------------------------------------------------------
    def training_loss(
        self,
        model: Model,
        x0: torch.Tensor,
        t: Optional[torch.Tensor] = None,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """L_simple (Algorithm 1, Eq. 14): E_{t, eps} || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1-abar_t) eps, t) ||^2.

        ``x0`` is a [B, C, H, W] batch scaled to [-1, 1]; ``t`` defaults to uniform over {0, ..., T-1}.
        Returns the scalar mean over batch and pixels. For the ``x0``/``v`` objectives the target changes
        accordingly (unweighted MSE).
        """
        b = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (b,), device=x0.device, generator=generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        xt = self.q_sample(x0, t, noise)
        out = model(xt, t)
        if self.objective is Objective.EPS:
            target = noise
        elif self.objective is Objective.X0:
            target = x0
        else:
            target = self.v_target(x0, t, noise)
        return F.mse_loss(out.float(), target.float())

    # -- reverse process --------------------------------------------------------------------------------------
    def p_mean_variance(
        self,
        model: Model,
        xt: torch.Tensor,
        t: torch.Tensor,
        variance: str | Variance = Variance.FIXED_LARGE,
        clip_denoised: bool = True,
    ):
        """Mean, variance, log-variance of p_theta(x_{t-1} | x_t), and the predicted x_0 (Eq. 11 via Eq. 7)."""
        variance = _enum(Variance, variance, "variance")
        self._check_t(t, xt.shape[0])
        _, x0 = self.model_predictions(model, xt, t, clip_denoised)
        mean, post_var, post_log_var = self.q_posterior_mean_variance(x0, xt, t)
        if variance is Variance.FIXED_SMALL:
            return mean, post_var, post_log_var, x0
        var = self._coef("_large_variance", t, xt.shape)
        return mean, var, torch.log(var), x0

    def p_sample(
        self,
        model: Model,
        xt: torch.Tensor,
        t: torch.Tensor,
        noise: Optional[torch.Tensor] = None,
        variance: str | Variance = Variance.FIXED_LARGE,
        clip_denoised: bool = True,
        return_x0: bool = False,
    ):
        """One ancestral step of Algorithm 2: x_{t-1} = mu_theta(x_t, t) + sigma_t z, with no noise at index 0.

        ``noise`` is z, [B, C, H, W]; drawn with ``torch.randn_like`` when omitted.
        """
        mean, _, log_var, x0 = self.p_mean_variance(model, xt, t, variance, clip_denoised)
        if noise is None:
            noise = torch.randn_like(xt)
        nonzero = (t != 0).to(xt.dtype).reshape(-1, *([1] * (xt.ndim - 1)))
        x_prev = mean + nonzero * torch.exp(0.5 * log_var) * noise
        return (x_prev, x0) if return_x0 else x_prev

    def ddim_step(
        self,
        model: Model,
        xt: torch.Tensor,
        t: torch.Tensor,
        t_prev: torch.Tensor,
        eta: float = 0.0,
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        return_x0: bool = False,
    ):
        """One DDIM update (Song et al. 2021, Eq. 12) from index ``t`` to ``t_prev`` (-1 means x_0).

        sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev); eta=0 is deterministic,
        and eta=1 over consecutive steps is the ancestral sampler with sigma^2 = beta-tilde (Eq. 16).
        """
        self._check_t(t, xt.shape[0])
        eps, x0 = self.model_predictions(model, xt, t, clip_denoised)
        ab = self._coef("alphas_cumprod", t, xt.shape)
        # abar at index -1 is 1: the last step lands exactly on the predicted x_0.
        ab_prev = torch.where(
            (t_prev >= 0).reshape(-1, *([1] * (xt.ndim - 1))),
            self._coef("alphas_cumprod", t_prev.clamp(min=0), xt.shape),
            torch.ones_like(ab),
        )
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
        x_prev = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            if noise is None:
                noise = torch.randn_like(xt)
            x_prev = x_prev + sigma * noise
        return (x_prev, x0) if return_x0 else x_prev
