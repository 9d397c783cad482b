"""The paper's UNet (Ho et al. 2020, Appendix B), a PixelCNN++-style backbone with a time embedding.

With the CIFAR-10 configuration (3x32x32, ch=128, ch_mult=(1, 2, 2, 2), 2 residual blocks per level, attention
at 16x16, dropout 0.1) it has exactly 35,746,307 parameters, the paper's "35.7M".
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .unet_config import UNetConfig, UNetConfigError  # noqa: F401  (the network's config: one import)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoidal embedding of integer timesteps: [B] -> [B, dim] (sin half, then cos half)."""
    half = dim // 2
    # max(): dim 2 or 3 (ch=2/3 is a valid config) would divide 0 by 0 and make every output NaN.
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1)
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _init(module: nn.Module, zero: bool = False) -> nn.Module:
    # The paper's code: variance scaling (fan_avg, uniform) == Xavier uniform, zero biases; the last layer of
    # each residual branch and the output conv start at zero so every block starts as the identity.
    if zero:
        nn.init.zeros_(module.weight)
    else:
        nn.init.xavier_uniform_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the projected time embedding, then GroupNorm-SiLU-dropout-conv, residual."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, groups: int, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = _init(nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.temb_proj = _init(nn.Linear(temb_ch, out_ch))
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _init(nn.Conv2d(out_ch, out_ch, 3, padding=1), zero=True)
        self.skip = _init(nn.Conv2d(in_ch, out_ch, 1)) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with 1x1 q/k/v/out projections (Appendix B)."""

    def __init__(self, ch: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=eps)
        self.qkv = _init(nn.Conv2d(ch, 3 * ch, 1))
        self.proj_out = _init(nn.Conv2d(ch, ch, 1), zero=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # Positions-major [B, HW, 3C]: a free view of an NHWC (channels_last) tensor, one copy of an NCHW one.
        qkv = self.qkv(self.norm(x)).permute(0, 2, 3, 1).reshape(b, h * w, 3 * c)
        q, k, v = qkv.chunk(3, dim=-1)  # each [B, HW, C]
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(out.reshape(b, h, w, c).permute(0, 3, 1, 2))


class Downsample(nn.Module):
    """3x3 conv with stride 2; TensorFlow's 'SAME' padding (0 before, 1 after) as in the paper's code."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = _init(nn.Conv2d(ch, ch, 3, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = _init(nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x_t, t): [B, C, H, W] images and [B] integer timesteps -> [B, C, H, W] predicted noise.

    Args mirror :class:`UNetConfig`: ``image_channels``, ``image_size``, ``ch`` (base channels), ``ch_mult``
    (multiplier per level; a level is halved after each but the last), ``num_res_blocks`` per level,
    ``attn_resolutions`` (side lengths that get self-attention), ``dropout``, and ``num_groups`` and ``norm_eps``
    of every GroupNorm.
    """

    def __init__(
        self,
        image_channels: int = 3,
        image_size: int = 32,
        ch: int = 128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions=(16,),
        dropout: float = 0.1,
        num_groups: int = 32,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        cfg = UNetConfig(image_channels, image_size, ch, tuple(ch_mult), num_res_blocks, tuple(attn_resolutions),
                         dropout, num_groups, norm_eps)
        self.config = cfg
        temb_ch = 4 * ch
        g, eps = num_groups, norm_eps
        self.temb = nn.Sequential(_init(nn.Linear(ch, temb_ch)), nn.SiLU(), _init(nn.Linear(temb_ch, temb_ch)))
        self.conv_in = _init(nn.Conv2d(image_channels, ch, 3, padding=1))

        # Down path; `skips` records the channels of every activation pushed for the up path.
        self.down = nn.ModuleList()
        skips = [ch]
        cur = ch
        for level, mult in enumerate(cfg.ch_mult):
            res = cfg.resolutions[level]
            stage = nn.Module()
            stage.res, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.res.append(ResBlock(cur, ch * mult, temb_ch, dropout, g, eps))
                cur = ch * mult
                stage.attn.append(AttnBlock(cur, g, eps) if res in cfg.attn_resolutions else nn.Identity())
                skips.append(cur)
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(cur)
                skips.append(cur)
            self.down.append(stage)

        self.mid = nn.ModuleList([ResBlock(cur, cur, temb_ch, dropout, g, eps), AttnBlock(cur, g, eps),
                                  ResBlock(cur, cur, temb_ch, dropout, g, eps)])

        # Up path: num_res_blocks + 1 blocks per level, each taking one skip by concatenation.
        self.up = nn.ModuleList()
        for level in reversed(range(len(cfg.ch_mult))):
            res = cfg.resolutions[level]
            stage = nn.Module()
            stage.res, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.res.append(ResBlock(cur + skips.pop(), ch * cfg.ch_mult[level], temb_ch, dropout, g, eps))
                cur = ch * cfg.ch_mult[level]
                stage.attn.append(AttnBlock(cur, g, eps) if res in cfg.attn_resolutions else nn.Identity())
            if level != 0:
                stage.upsample = Upsample(cur)
            self.up.append(stage)
        assert not skips

        self.norm_out = nn.GroupNorm(g, cur, eps=eps)
        self.conv_out = _init(nn.Conv2d(cur, image_channels, 3, padding=1), zero=True)

    def _channels_last(self) -> bool:
        w = self.conv_out.weight  # [C, ch, 3, 3]: ch > 1, so the two layouts are distinguishable
        return not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, cfg: UNetConfig | Mapping[str, Any]) -> "UNet":
        if not isinstance(cfg, UNetConfig):
            cfg = UNetConfig.from_dict(cfg)
        return cls(**asdict(cfg))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self._channels_last():  # ddpm.perf.prepare_model(channels_last=True): feed NHWC so no layer converts
            x = x.contiguous(memory_format=torch.channels_last)
        # Weights cast to bf16/fp16 (inference) set the compute dtype; the caller's float32 x_t is cast on the way in.
        dtype = self.conv_in.weight.dtype
        temb = self.temb(timestep_embedding(t, self.config.ch).to(dtype))
        h = self.conv_in(x.to(dtype))
        hs = [h]
        for stage in self.down:
            for res, attn in zip(stage.res, stage.attn):
                h = attn(res(h, temb))
                hs.append(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
                hs.append(h)
        h = self.mid[0](h, temb)
        h = self.mid[1](h)
        h = self.mid[2](h, temb)
        for stage in self.up:
            for res, attn in zip(stage.res, stage.attn):
                h = attn(res(torch.cat([h, hs.pop()], dim=1), temb))
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
