"""Speed switches for training and sampling, each a param with a measured default (see BENCHMARKS.md).

None of them but ``precision`` changes what is computed, only how: the outputs agree with the plain eager path
within float32 round-off (tests/test_perf.py checks each).

- ``channels_last``: NHWC memory layout for the network's weights and activations (oneDNN/cuDNN convolutions and
  GroupNorm have NHWC kernels; whether they are faster depends on the machine, hence a switch).
- ``compile``: ``torch.compile`` of the network (Inductor). Pays on GPU and for small networks whose time goes to
  Python/launch overhead; costs a compilation of tens of seconds to minutes up front, so it is off by default.
- ``precision`` (sampling): :class:`Autocast` runs the network under bf16 autocast and hands float32 back, so the
  diffusion arithmetic around it stays float32. Changes results within bf16 round-off, unlike the others.
- ``adam_impl``: ``torch.optim.Adam``'s implementation: ``fused`` (one kernel over all parameters, CPU and GPU),
  ``foreach`` (multi-tensor ops), ``loop`` (one parameter at a time) or ``auto`` (torch's own choice).
"""

from __future__ import annotations

from typing import Iterable, Literal

import torch
from torch import nn

AdamImpl = Literal["auto", "fused", "foreach", "loop"]
ADAM_IMPLS = ("auto", "fused", "foreach", "loop")


def prepare_model(model: nn.Module, *, channels_last: bool = False, compile: bool = False,
                  compile_backend: str = "inductor") -> nn.Module:
    """Apply the memory-layout switch to ``model`` in place; return the module to call (compiled when ``compile``).

    Call it with ``channels_last`` on the bare network before an EMA copy or optimizer is made (so they share the
    layout), and with ``compile`` on what the loop calls, after any DDP wrapper (torch's advice for DDP). The
    compiled module shares parameters with ``model``; keep ``model`` for ``state_dict``, EMA and checkpoints.
    ``compile_backend`` is torch.compile's backend (Inductor generates fused kernels; tests use "aot_eager").
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        # dynamic=False: training and sampling batches have one fixed shape, so one specialised graph.
        return torch.compile(model, dynamic=False, backend=compile_backend)
    return model


def make_adam(params: Iterable[torch.nn.Parameter], lr: float, impl: AdamImpl = "auto") -> torch.optim.Adam:
    """``torch.optim.Adam`` with the chosen implementation; the state dict is the same for all of them."""
    if impl not in ADAM_IMPLS:
        raise ValueError(f"unknown Adam implementation {impl!r}; known: {', '.join(ADAM_IMPLS)}")
    kwargs: dict = {}
    if impl == "fused":
        kwargs["fused"] = True
    elif impl == "foreach":
        kwargs["foreach"] = True
    elif impl == "loop":
        kwargs["foreach"] = False
    return torch.optim.Adam(params, lr=lr, **kwargs)


class Autocast(nn.Module):
    """``model(x_t, t)`` under autocast to ``dtype`` on ``device_type``, returning float32 ``[B, C, H, W]``.

    Wrap before :func:`prepare_model` compiles, so that the compiled graph holds the casts. The wrapped network
    keeps its float32 weights (``.module``).
    """

    def __init__(self, module: nn.Module, device_type: str = "cuda", dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.module(x, t).float()


def prepare_for_sampling(model: nn.Module, device: torch.device | str, *, precision: str = "fp32",
                         channels_last: bool = False, compile: bool = False) -> nn.Module:
    """The module samplers should call: ``model`` in eval mode on ``device``, under bf16 autocast when ``precision``
    is ``"bf16"`` on a GPU (ignored on CPU), then the layout and compile switches (:func:`prepare_model`)."""
    device = torch.device(device)
    model = model.to(device).eval()
    if precision == "bf16" and device.type == "cuda":
        model = Autocast(model, "cuda", torch.bfloat16)
    return prepare_model(model, channels_last=channels_last, compile=compile)
