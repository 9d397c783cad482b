"""A small CNN classifier of the dataset's labels, and the torch-fidelity feature extractor built on it.

Inception-v3 features mean little on 8x8 or 28x28 grayscale digits, so for labeled grayscale datasets FID/KID
are computed in the feature space of a classifier trained on the same data (the "FID with a domain classifier"
used for MNIST-like data). The extractor is registered with torch-fidelity as :data:`FEATURE_EXTRACTOR_NAME`
and reads its weights from ``feature_extractor_weights_path``:

    torch_fidelity.calculate_metrics(..., feature_extractor=FEATURE_EXTRACTOR_NAME,
                                     feature_extractor_weights_path="models/classifier.pt")

The weights file holds ``model`` (state dict) and ``model_args`` (constructor arguments), so the network is
rebuilt from the file alone; it is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from ddpm.checkpoint import CheckpointError, atomic_write_bytes

FEATURE_EXTRACTOR_NAME = "ddpm-classifier"
CHECKPOINT_FORMAT = "ddpm-classifier/1"
SKIPPED_FORMAT = "ddpm-classifier-skipped/1"  # written in place of weights when no stage reads a classifier


@dataclass(frozen=True)
class ClassifierArgs:
    """What rebuilds the network: input (channels, side), number of classes and base width."""

    channels: int
    image_size: int
    num_classes: int
    width: int

    @property
    def feature_dim(self) -> int:
        return 4 * self.width


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Classifier(nn.Module):
    """Conv stages (two 3x3 convs each, 2x2 max-pool between stages until the side is about 4), global average
    pooling, a penultimate feature layer and a linear head.

    ``forward(x)``: x float [B, C, H, W] in [-1, 1] -> (features [B, 4*width], logits [B, num_classes]).
    """

    def __init__(self, args: ClassifierArgs):
        super().__init__()
        self.args = args
        # As many halvings as keep the map at least 4 pixels wide: 8 -> 4, 28 -> 7, 32 -> 4.
        n_down = max(0, int(math.floor(math.log2(args.image_size / 4))))
        layers: list[nn.Module] = []
        c_in = args.channels
        for i in range(n_down + 1):
            c_out = args.width * min(2**i, 4)
            layers += [_conv(c_in, c_out), _conv(c_out, c_out)]
            if i < n_down:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(c_in, args.feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(args.feature_dim, args.num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.fc(self.pool(self.body(x)).flatten(1))
        return features, self.head(features)


def save_classifier(path: os.PathLike | str, model: Classifier, extra: dict[str, Any] | None = None) -> None:
    """Atomically write the weights file: state dict, constructor args and plain-data ``extra``."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_args": asdict(model.args),
        **(extra or {}),
    }
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def save_skipped(path: os.PathLike | str, reason: str) -> None:
    """Atomically write the marker that stands for the weights file when the stage was not needed (``reason``):
    DVC still finds the stage's output, and a stage that loads it is told why there are no weights."""
    atomic_write_bytes(path, lambda f: torch.save({"format": SKIPPED_FORMAT, "reason": reason}, f))


def load_classifier(path: os.PathLike | str, map_location: str | torch.device = "cpu") -> tuple[Classifier, dict]:
    """Rebuild the classifier from its weights file alone, in eval mode. Returns (model, the whole file's dict).

    Raises :class:`CheckpointError` naming the file when it is missing, unreadable or not a classifier file.
    """
    if not os.path.isfile(path):
        raise CheckpointError(path, "classifier weights not found; run the train_classifier stage first")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(path, f"unreadable classifier weights ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and state.get("format") == SKIPPED_FORMAT:
        raise CheckpointError(path, f"no classifier was trained ({state.get('reason')}); rerun train_classifier "
                              "with the params that evaluate uses")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(path, f"not a classifier weights file (expected format {CHECKPOINT_FORMAT!r})")
    try:
        model = Classifier(ClassifierArgs(**state["model_args"]))
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(path, f"classifier weights do not match their model_args ({e})") from None
    return model.eval(), state


class ClassifierFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor over a trained :class:`Classifier`.

    Takes what torch-fidelity hands every extractor, uint8 [B, 3, H, W] (grayscale expanded to 3 channels),
    maps it back to the classifier's channel count and [-1, 1] scale, and returns the requested features:
    ``"features"`` (penultimate layer, [B, 4*width], for FID/KID/PRC) and ``"logits"`` ([B, classes], for IS).
    """

    def __init__(self, name: str, features_list, feature_extractor_weights_path: str | None = None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"feature extractor {name!r} needs feature_extractor_weights_path (the classifier file)")
        self.net, _ = load_classifier(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        raise NotImplementedError("the classifier feature extractor is not compiled")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = self.net.args
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {getattr(x, 'dtype', type(x))} "
                             f"{tuple(getattr(x, 'shape', ()))}")
        if tuple(x.shape[2:]) != (args.image_size, args.image_size):
            raise ValueError(f"images are {tuple(x.shape[2:])}, the classifier was trained on "
                             f"{args.image_size}x{args.image_size}")
        x = x.float()
        if args.channels == 1:
            x = x.mean(dim=1, keepdim=True)  # torch-fidelity repeated the gray channel; the mean is exact
        features, logits = self.net(x.div(127.5).sub(1.0))
        out = {"features": features, "logits": logits}
        return tuple(out[name].float() for name in self.features_list)


def register() -> str:
    """Register the extractor with torch-fidelity (idempotent; the registry refuses duplicates). Returns its name."""
    if FEATURE_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(FEATURE_EXTRACTOR_NAME, ClassifierFeatureExtractor)
    return FEATURE_EXTRACTOR_NAME


register()
