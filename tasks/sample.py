"""Stage `sample`: many samples from a trained checkpoint, in fixed-size shards spread over Ray actors.

Sample ``i`` uses seed ``sample.seed + i``; shards are planned from the seeds and sampled in batches of
``sample.batch_size`` with one intra-op thread per CPU actor, so on one machine the images are bitwise identical
for any ``sample.num_workers`` (docs/pipeline.md "Reproducibility"). Finished shards whose key (checkpoint, sampler settings,
sampling code) and content match are kept on rerun. ``sample.mode`` ``img2img`` and ``inpaint`` start from the
held-out images of ``--data``. The machinery is :mod:`tasks.lib.sampling`; this stage adds the command line, which
reports the samples to the trackers (tasks/lib/callbacks.py).

    python -m tasks.sample --params params.yaml --checkpoints checkpoints --out samples
    python -m tasks.sample --set sample.mode=inpaint --data data/dataset --out samples_inpaint
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from tasks.lib.config import Config

from .lib.callbacks import after_stage
from .lib.common import run_cli, stage_parser
from .lib.inputs import stage_config
from .lib.sampling import sample_shards


def run(cfg: Config, ckpt_dir, out_dir, data_dir=None) -> dict[str, Any]:
    """Sample ``sample.num_samples`` x ``evaluate.repeats`` images into ``out_dir`` (shards, grid.png of the grid
    seeds, samples.json); returns the summary (see :func:`tasks.lib.sampling.sample_shards`). ``data_dir`` is read
    only in the img2img and inpaint modes."""
    return sample_shards(cfg, ckpt_dir, out_dir, data_dir)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = stage_parser("Sample images from the newest checkpoint over Ray actors (Algorithm 2 or DDIM).")
    p.add_argument("--checkpoints", default="checkpoints", help="checkpoint folder from the train stage")
    p.add_argument("--out", default="samples", help="output folder (shards, grid.png, samples.json)")
    p.add_argument("--data", default=None,
                   help="dataset folder (fetch output) whose held-out images sample.mode img2img/inpaint start from")
    args = p.parse_args(argv)
    cfg = stage_config(args)
    summary = run(cfg, args.checkpoints, args.out, args.data)
    after_stage("sample", cfg, samples=args.out, samples_record=Path(args.out) / "samples.json")
    print(f"{summary['count']} samples in {args.out} ({summary['shards_reused']} shards reused); grid: {summary['grid']}")
    return summary


if __name__ == "__main__":
    run_cli(main)
