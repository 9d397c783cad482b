"""``ddpm info``: what a config costs before anything runs: parameters, FLOPs per image, memory estimates.

Everything is measured on PyTorch's ``meta`` device (shapes without data), so even the 256x256 model is
inspected in seconds without allocating its memory:

- parameters: of the UNet the config builds (the paper's counts: 35,746,307 at CIFAR-10, 113,673,219 at 256x256);
- FLOPs per image: ``torch.utils.flop_counter.FlopCounterMode`` over one forward pass, and one training step
  (forward + backward of L_simple); a sample costs the forward times the sampler's network evaluations;
- memory per training worker: fp32 weights, gradients, Adam's two moments, the EMA copy, and the activations
  autograd keeps for the backward pass at the per-worker batch (``train.batch_size / train.num_workers``),
  counted from the tensors it saves (without allocator overhead or workspace: a lower estimate).

    ddpm info --params configs/cifar10.yaml          # or: python -m tasks.lib.info --params ...
    ddpm info --params params.yaml --json

:func:`cli` is the ``ddpm`` console script; it also runs ``ddpm import-diffusers`` and ``ddpm export-diffusers``
(tasks/lib/diffusers_cli.py).
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional, Sequence

import torch

from tasks.lib.config import Config, load_config

from .cli import stage_parser


def _meta_model(cfg: Config):
    from ddpm.unet import UNet

    with torch.device("meta"):
        return UNet.from_config(cfg.unet_config())


def count_flops(cfg: Config, backward: bool = False) -> dict[str, int]:
    """FLOPs of one image: ``forward`` (one network evaluation) and ``train_step`` (forward + backward).

    The training step is 3x the forward (backward ~2x forward; counted: 2.9994x on the CIFAR-10 model) unless
    ``backward`` counts it too (5x slower)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _meta_model(cfg).train()
    c, h, w = cfg.data.shape
    x = torch.zeros(1, c, h, w, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as fwd:
        model(x, t)
    forward = int(fwd.get_total_flops())
    if not backward:
        return {"forward": forward, "train_step": 3 * forward}
    with FlopCounterMode(display=False) as step:
        model(x, t).square().mean().backward()
    return {"forward": forward, "train_step": int(step.get_total_flops())}


def _saved_bytes(model, cfg: Config, batch: int) -> int:
    c, h, w = cfg.data.shape
    seen: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor):
        seen.setdefault(id(tensor), tensor)  # the same tensor saved by two ops is stored once
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(torch.zeros(batch, c, h, w, device="meta"), torch.zeros(batch, dtype=torch.long, device="meta"))
    params = {id(p) for p in model.parameters()}
    return int(sum(tt.numel() * tt.element_size() for k, tt in seen.items() if k not in params))


def activation_bytes(cfg: Config, batch: int) -> int:
    """Bytes of the tensors autograd saves for backward in one training forward pass at ``batch`` images.

    They are a fixed part (views of the weights) plus a part linear in the batch, so two tiny passes (1 and 2
    images) give the count at any batch exactly, in a fraction of the time of a pass at the batch itself."""
    model = _meta_model(cfg).train()
    one, two = _saved_bytes(model, cfg, 1), _saved_bytes(model, cfg, 2)
    per_image = two - one
    return (one - per_image) + batch * per_image


def info(cfg: Config) -> dict[str, Any]:
    """The numbers ``ddpm info`` prints, as a dict (bytes and FLOPs as integers)."""
    from ddpm.unet import count_parameters

    model = _meta_model(cfg)
    n = count_parameters(model)
    flops = count_flops(cfg)
    tc, s = cfg.train, cfg.sample
    per_worker = max(1, tc.batch_size // tc.num_workers)
    evals = cfg.diffusion.timesteps if s.sampler == "ddpm" else s.steps
    weights = n * 4  # fp32
    memory = {"weights": weights, "gradients": weights, "adam_moments": 2 * weights,
              "ema": weights if tc.ema_decay > 0 else 0, "activations": activation_bytes(cfg, per_worker)}
    memory["total"] = sum(memory.values())
    return {
        "image_shape": list(cfg.data.shape),
        "parameters": n,
        "flops_per_image": {**flops, "sample": flops["forward"] * evals},
        "sampler": f"{s.sampler}-{evals}",
        "train_batch": {"global": tc.batch_size, "workers": tc.num_workers, "per_worker": per_worker},
        "train_flops_total": flops["train_step"] * tc.batch_size * tc.steps,
        "memory_bytes_per_worker": memory,
    }


def _si(x: float, unit: str) -> str:
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _mib(b: int) -> str:
    return f"{b / 2**20:,.1f} MiB" if b < 2**30 else f"{b / 2**30:,.2f} GiB"


def render(cfg: Config, d: dict[str, Any]) -> str:
    m, f, tb = d["memory_bytes_per_worker"], d["flops_per_image"], d["train_batch"]
    c, h, w = d["image_shape"]
    mc = cfg.model
    lines = [
        f"model        UNet ch={mc.ch} ch_mult={list(mc.ch_mult)} res_blocks={mc.num_res_blocks} "
        f"attn={list(mc.attn_resolutions)} on {c}x{h}x{w}",
        f"parameters   {d['parameters']:,}",
        f"FLOPs/image  forward {_si(f['forward'], 'FLOP')}, training step (fwd+bwd) {_si(f['train_step'], 'FLOP')}, "
        f"one sample with {d['sampler']} {_si(f['sample'], 'FLOP')}",
        f"training     {cfg.train.steps:,} steps x batch {tb['global']} = {_si(d['train_flops_total'], 'FLOP')}",
        f"memory       per training worker (batch {tb['per_worker']} of {tb['global']}, {tb['workers']} "
        "worker(s)), fp32:",
        f"  weights      {_mib(m['weights'])}",
        f"  gradients    {_mib(m['gradients'])}",
        f"  Adam m, v    {_mib(m['adam_moments'])}",
        f"  EMA          {_mib(m['ema'])}",
        f"  activations  {_mib(m['activations'])} (tensors saved for backward)",
        f"  total        {_mib(m['total'])} + allocator/workspace overhead",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = stage_parser("Parameter count, FLOPs per image and memory estimates of a config's model.")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = p.parse_args(argv)
    cfg = load_config(args.params, args.overrides)
    d = info(cfg)
    print(json.dumps(d, indent=2) if args.json else render(cfg, d))
    return d


USAGE = """usage: ddpm COMMAND [options]   (ddpm COMMAND --help for its options)
  info              ddpm info --params configs/X.yaml [--set section.key=value] [--json]
  import-diffusers  ddpm import-diffusers FOLDER --out checkpoints/ [--scheduler scheduler_config.json]
  export-diffusers  ddpm export-diffusers --checkpoint checkpoints/ --out FOLDER [--metrics metrics/eval.json]"""


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """The ``ddpm`` console script: ``ddpm info``, ``ddpm import-diffusers``, ``ddpm export-diffusers``. A bad
    input is one line on stderr and exit status 2 (:func:`tasks.lib.cli.run_cli`)."""
    from .cli import run_cli
    from .diffusers_cli import export_main, import_main

    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"info": main, "import-diffusers": import_main, "export-diffusers": export_main}
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] not in commands:
        print(f"error: unknown command {argv[0]!r}; known: {', '.join(commands)}", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 2
    try:
        run_cli(commands[argv[0]], argv[1:])
    except SystemExit as e:  # run_cli's exit 2 on a bad input, argparse's on --help or a bad option
        return e.code if isinstance(e.code, int) else 2
    return 0


if __name__ == "__main__":
    sys.exit(cli(["info", *sys.argv[1:]]))
