"""Exponential moving average of the weights (the paper uses decay 0.9999), via torch's AveragedModel."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class EMA(AveragedModel):
    """``theta_ema <- decay * theta_ema + (1 - decay) * theta`` after each optimizer step.

    A thin :class:`torch.optim.swa_utils.AveragedModel` whose buffers (none in the UNet, but any GroupNorm
    statistics in other models) are averaged too. The averaged network is ``ema.module``; use it for sampling.
    Pass the bare model, not a DDP wrapper.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.decay = decay
        # AveragedModel *copies* the weights on its first update (n_averaged == 0); the copy made above is already
        # theta_0, so count it, and every update, the first included, is the EMA step documented above.
        self.n_averaged.fill_(1)
        self.module.eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.update_parameters(model)
