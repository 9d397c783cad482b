"""Stage `train_classifier`: the CNN whose penultimate features FID/KID use on labeled grayscale datasets.

Adam with a cosine-decayed learning rate on the train split, one-pixel random shifts as augmentation, a fixed
seed; accuracy measured on the holdout split. Writes the weights file (rebuildable from the file alone, see
:mod:`tasks.lib.classifier`) and a metrics JSON, both atomically.

    python -m tasks.train_classifier --params params.yaml --data data/dataset --out models/classifier.pt \
        --metrics metrics/classifier.json
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tasks.lib.config import Config, load_config, write_resolved

from .lib.classifier import Classifier, ClassifierArgs, save_classifier, save_skipped
from .lib.cli import run_cli, stage_parser
from .lib.errors import StageError
from .lib.files import check_writable, write_json
from .lib.images import to_model_range
from .lib.inputs import check_for_dvc_stage, classifier_needed, extractor_for
from .lib.shards import load_dataset


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of x [B, C, H, W] by up to ``max_shift`` pixels (edges replicated)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, restoring the previous count after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def accuracy(model: Classifier, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on x [N, C, H, W] in [-1, 1] with labels y [N]."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        _, logits = model(x[i:i + batch_size])
        correct += (logits.argmax(1) == y[i:i + batch_size]).sum().item()
    return correct / max(len(x), 1)


def _labeled(images, labels) -> tuple[torch.Tensor, torch.Tensor]:
    keep = labels >= 0  # -1 marks an unknown label
    return to_model_range(images[keep]), torch.as_tensor(labels[keep])


def run(cfg: Config, data_dir: os.PathLike | str, out_path: os.PathLike | str,
        metrics_path: os.PathLike | str) -> dict[str, Any]:
    """Train on ``data_dir``'s train split, write the weights to ``out_path`` and metrics to ``metrics_path``.

    Returns the metrics: accuracy (holdout), num_holdout, num_train, num_classes, train_loss (mean of the last 50
    steps), steps. When no stage reads a classifier under ``cfg`` (FID on Inception features; see
    :func:`tasks.lib.inputs.classifier_needed`) nothing is trained: ``out_path`` gets a marker saying why and the metrics
    are ``{"skipped": true, "reason": ...}``. Raises :class:`StageError` for a dataset without labels when
    ``evaluate.feature_extractor`` is ``classifier``.
    """
    c = cfg.classifier
    check_writable(Path(out_path).parent, Path(metrics_path).parent)
    data = load_dataset(data_dir)
    needed, why = classifier_needed(cfg, extractor_for(cfg.evaluate.feature_extractor, data.shape[0],
                                                       data.num_classes > 0), data.shape, data.meta.get("dataset"))
    if not needed:
        # Nothing reads a classifier under these params: say so in its place instead of training one for minutes.
        save_skipped(out_path, why)
        metrics = {"skipped": True, "reason": why}
        write_json(metrics_path, metrics)
        write_resolved(cfg, Path(out_path).parent, f"{Path(out_path).stem}.config.json")
        print(f"classifier: skipped, {why}")
        return metrics
    if data.num_classes < 2:
        raise StageError(
            f"{data_dir}: dataset {data.meta.get('dataset', '?')!r} has no class labels (num_classes "
            f"{data.num_classes}), so no classifier can be "
            "trained; set evaluate.feature_extractor: inception-v3-compat (with evaluate.inception_weights)")
    x_train, y_train = _labeled(data.train.images, data.train.labels)
    x_hold, y_hold = _labeled(data.holdout.images, data.holdout.labels)
    if len(x_train) == 0 or len(x_hold) == 0:
        raise StageError(f"{data_dir}: the train and holdout splits need labeled images "
                         f"(found {len(x_train)} and {len(x_hold)})")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(c.seed)
    gen = torch.Generator().manual_seed(c.seed)
    channels, size, _ = data.shape
    model = Classifier(ClassifierArgs(channels, size, data.num_classes, c.width)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=c.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c.steps)
    max_shift = max(1, size // 8)  # 1 pixel on 8x8 digits, 3 on 28x28, 4 on 32x32

    t0 = time.perf_counter()
    losses: list[float] = []
    order = torch.empty(0, dtype=torch.long)
    model.train()
    # On CPU the network's small convolutions gain nothing from intra-op threads: on 8x8 digits one thread is
    # twice as fast as two, and 15x faster when other processes share the cores (OpenMP threads spin-wait).
    with intra_op_threads(1 if device.type == "cpu" else torch.get_num_threads()):
        for _ in tqdm(range(c.steps), desc="classifier", unit="step", leave=False, mininterval=1.0):
            if len(order) < c.batch_size:  # reshuffle each epoch; the tail of the last one starts the next
                order = torch.cat([order, torch.randperm(len(x_train), generator=gen)])
            idx, order = order[:c.batch_size], order[c.batch_size:]
            xb = random_shift(x_train[idx], max_shift, gen).to(device)
            _, logits = model(xb)
            loss = F.cross_entropy(logits, y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        seconds = time.perf_counter() - t0
        acc = accuracy(model, x_hold.to(device), y_hold.to(device))
    metrics = {
        "accuracy": acc,
        "num_holdout": len(x_hold),
        "num_train": len(x_train),
        "num_classes": data.num_classes,
        "train_loss": sum(losses[-50:]) / len(losses[-50:]),
        "steps": c.steps,
    }
    save_classifier(out_path, model, {"dataset_sha256": data.meta.get("sha256"), "accuracy": acc})
    write_json(metrics_path, metrics)
    write_resolved(cfg, Path(out_path).parent, f"{Path(out_path).stem}.config.json")
    # Wall time is printed, not stored: the metrics file stays identical across identical runs.
    print(f"classifier: {c.steps} steps in {seconds:.1f} s on {device.type}; held-out accuracy {acc:.4f} "
          f"on {len(x_hold)} images -> {out_path}")
    return metrics


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = stage_parser("Train the digit/class classifier used as the FID/KID feature extractor.")
    p.add_argument("--data", required=True, help="dataset folder (output of the fetch stage)")
    p.add_argument("--out", required=True, help="weights file to write, e.g. models/classifier.pt")
    p.add_argument("--metrics", required=True, help="metrics JSON to write, e.g. metrics/classifier.json")
    args = p.parse_args(argv)
    cfg = load_config(args.params, args.overrides)
    check_for_dvc_stage(cfg)  # under `dvc repro`: the inputs of this stage and the later ones, before any compute
    return run(cfg, args.data, args.out, args.metrics)


if __name__ == "__main__":
    run_cli(main)
