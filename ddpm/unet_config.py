"""The UNet's configuration (:class:`UNetConfig`) and its checks, without torch: the pipeline's config
(tasks/lib/config.py) validates a model section with them in processes that never build a network (fetch, the flow).
:mod:`ddpm.unet` builds the network from it and re-exports both names."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping


class UNetConfigError(ValueError):
    """An invalid UNet configuration; ``field`` names the offending argument."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    def __reduce__(self):  # rebuilt from both arguments: Ray pickles a worker's error to its driver
        return type(self), (self.field, self.message)


@dataclass(frozen=True)
class UNetConfig:
    image_channels: int = 3
    image_size: int = 32
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_groups: int = 32
    # GroupNorm's epsilon. The paper's TensorFlow code (and every published diffusers config of it) uses 1e-6; 1e-5 is
    # torch's default, what every checkpoint written before this field existed was trained with, so a stored config
    # without the key reads as 1e-5 and loads bit for bit as before.
    norm_eps: float = 1e-5

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        self.validate()

    @property
    def resolutions(self) -> list[int]:
        """Feature-map side length at each level, from the input down."""
        return [self.image_size // 2**i for i in range(len(self.ch_mult))]

    def validate(self) -> None:
        positive = {
            "image_channels": self.image_channels,
            "image_size": self.image_size,
            "ch": self.ch,
            "num_res_blocks": self.num_res_blocks,
            "num_groups": self.num_groups,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UNetConfigError(name, f"must be a positive integer, got {value!r}")
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise UNetConfigError("ch_mult", f"must be a non-empty list of positive integers, got {list(self.ch_mult)}")
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % factor:
            raise UNetConfigError(
                "image_size",
                f"{self.image_size} is not divisible by {factor}, the total downsampling of "
                f"{len(self.ch_mult)} levels (ch_mult={list(self.ch_mult)})",
            )
        res = self.resolutions
        for r in self.attn_resolutions:
            if r not in res:
                raise UNetConfigError(
                    "attn_resolutions", f"resolution {r} never occurs; the levels have resolutions {res}"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise UNetConfigError("dropout", f"must be in [0, 1), got {self.dropout}")
        eps = self.norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps < 1.0:
            raise UNetConfigError("norm_eps", f"must be a number in (0, 1), got {eps!r}")
        for m in {1, *self.ch_mult}:
            if (self.ch * m) % self.num_groups:
                raise UNetConfigError(
                    "num_groups", f"{self.num_groups} groups do not divide {self.ch * m} channels (ch={self.ch} x {m})"
                )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNetConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise UNetConfigError(sorted(unknown)[0], f"unknown field; known: {', '.join(sorted(known))}")
        return cls(**d)
