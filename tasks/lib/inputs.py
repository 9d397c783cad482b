"""The files from outside the pipeline that its stages read, checked before any stage computes.

A run reads four kinds of file that no stage writes: a file-based dataset's sources under ``data.root``
(``fetch``), a published model ``train.pretrained`` (``train``, which imports it instead of training), the Inception
weights ``evaluate.inception_weights`` (``evaluate`` and ``sampler_table`` when their features are Inception's) and a
published reference ``evaluate.reference`` (``evaluate``). Each stage checks its own
when it starts, but a run of the whole pipeline should not train for minutes and then stop at ``evaluate`` over a
file that was missing from the start. So:

- the ``train-eval`` flow checks the inputs of every stage it will run before the first one starts;
- under ``dvc repro`` (DVC sets ``DVC_STAGE`` for each stage's command) the first stage that runs checks the inputs
  of itself and of every stage after it in ``dvc.yaml`` (:func:`check_for_dvc_stage`).

Which features FID uses is known from the params alone (:func:`planned_extractor`), except for a grayscale
``image-folder``, whose labels are known only once it is read; then both checks assume the classifier (the stage
itself still checks when it runs). :func:`classifier_needed` says whether the ``train_classifier`` stage's output
is read at all under the chosen settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from tasks.lib.config import Config

from .dvcfile import downstream, read_stages
from .errors import DataError, StageError

PROJECT = Path(__file__).resolve().parents[2]

INCEPTION_EXTRACTOR = "inception-v3-compat"
# tasks.lib.classifier.FEATURE_EXTRACTOR_NAME (tests/test_inputs.py checks they agree). Importing it would load
# torch-fidelity and torchvision (~1 s) in every stage, since every stage checks its inputs first.
CLASSIFIER_EXTRACTOR = "ddpm-classifier"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
LABELED_DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")
# The params that name files from outside the pipeline (relative paths are relative to the working directory).
EXTERNAL_PATH_KEYS = ("data.root", "train.pretrained", "evaluate.inception_weights", "evaluate.reference")
PRETRAINED_LAYOUTS = ("a diffusers DDPMPipeline folder (model_index.json, unet/, scheduler/) or a flat one (the UNet's "
                      "config.json beside scheduler_config.json: a bare UNet2DModel folder takes its scheduler so); "
                      "docs/diffusers.md")


# -- what the params ask for ----------------------------------------------------------------------------------------
def extractor_for(choice: str, channels: int, labeled: bool) -> str:
    """``evaluate.feature_extractor`` resolved: ``auto`` is the classifier on labeled grayscale data, else Inception."""
    if choice == "auto":
        return CLASSIFIER_EXTRACTOR if channels == 1 and labeled else INCEPTION_EXTRACTOR
    return CLASSIFIER_EXTRACTOR if choice == "classifier" else INCEPTION_EXTRACTOR


def planned_extractor(cfg: Config) -> Optional[str]:
    """The feature extractor the params select, or None when it depends on the data (a grayscale image folder
    with ``feature_extractor: auto``: labeled only when its images sit in class subfolders)."""
    labeled = cfg.data.dataset in LABELED_DATASETS
    if cfg.evaluate.feature_extractor == "auto" and cfg.data.shape[0] == 1 and not labeled:
        return None
    return extractor_for(cfg.evaluate.feature_extractor, cfg.data.shape[0], labeled)


def extractor_description(cfg: Config, extractor: str, shape: Optional[tuple[int, ...]] = None,
                          dataset: Optional[str] = None) -> str:
    """Why ``extractor`` was chosen, for messages: 'FID/KID/IS of 3x32x32 cifar10 images use ... features (...)'.
    ``shape`` and ``dataset`` are the fetched data's when known, else the params'."""
    c, h, w = shape or cfg.data.shape
    size = f"{c}x{h}x{w}" if h else f"{c}-channel"
    return f"FID/KID/IS of {size} {dataset or cfg.data.dataset} images use {extractor} features " \
           f"(evaluate.feature_extractor: {cfg.evaluate.feature_extractor})"


def classifier_needed(cfg: Config, extractor: Optional[str] = None, shape: Optional[tuple[int, ...]] = None,
                      dataset: Optional[str] = None) -> tuple[bool, str]:
    """(needed, why): whether any stage reads the ``train_classifier`` output under these params.

    ``extractor`` (with the data's ``shape`` and ``dataset`` name) is the resolved feature extractor when the data
    is known (the stage passes it); otherwise the one the params select. IS uses Inception's logits, never the
    classifier, so only FID/KID/precision-recall features (evaluate and sampler_table) can need it.
    """
    extractor = extractor or planned_extractor(cfg)
    if extractor is None:
        return True, "a grayscale image folder may be labeled; the stage decides once it reads the data"
    why = extractor_description(cfg, extractor, shape, dataset)
    if extractor == CLASSIFIER_EXTRACTOR:
        return True, why
    return False, f"not needed: {why}, not the classifier's"


# -- the files ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Missing:
    key: str  # the param that names the file
    message: str  # one line: the file, what is expected there, how to get it
    stages: tuple[str, ...]  # the stages that read it

    def line(self) -> str:
        return f"{self.key}: {self.message} (read by {', '.join(self.stages)})"


def inception_problem(cfg: Config) -> Optional[str]:
    """What is wrong with ``evaluate.inception_weights`` (not set, not a file), or None."""
    path = cfg.evaluate.inception_weights
    how = (f"download {INCEPTION_WEIGHTS_FILE} ({INCEPTION_WEIGHTS_URL}) on a machine with internet, copy it "
           f"e.g. to models/{INCEPTION_WEIGHTS_FILE} and set evaluate.inception_weights to that path")
    if not path:
        return (f"not set; the {INCEPTION_EXTRACTOR} feature extractor needs torch-fidelity's "
                f"{INCEPTION_WEIGHTS_FILE} offline: {how}")
    if not Path(path).is_file():
        return f"{path} not found (expected {INCEPTION_WEIGHTS_FILE}): {how}"
    return None


def inception_weights_path(cfg: Config) -> str:
    """The local Inception weights file; never downloaded (the machines are offline). Raises :class:`StageError`."""
    problem = inception_problem(cfg)
    if problem:
        raise StageError(f"evaluate.inception_weights: {problem}")
    return str(cfg.evaluate.inception_weights)


def source_problem(cfg: Config) -> Optional[str]:
    """What is missing of a file-based dataset's sources under ``data.root``, or None (digits ship with
    scikit-learn; ``data.download: true`` fetches missing files)."""
    from . import datasets as ds

    d = cfg.data
    if d.dataset == "digits" or d.download:
        return None
    root = Path(d.root)
    if d.dataset in ("mnist", "fashion-mnist"):
        raw = ds.mnist_raw_folder(d.dataset, root)
        missing = ds.mnist_missing(d.dataset, raw)
        return (f"{d.dataset}: missing {', '.join(missing)} in {raw}/ (the four IDX files, .gz or not)"
                if missing else None)
    if d.dataset == "cifar10":
        missing = ds.cifar10_missing(root)
        if missing and not (root / ds.CIFAR10_ARCHIVE).is_file():
            return (f"cifar10: missing {', '.join(missing)} in {root / ds.CIFAR10_FOLDER}/ (put the official "
                    f"{ds.CIFAR10_ARCHIVE} in {root} or extract it there)")
        return None
    if not root.is_dir():  # image-folder
        return f"image-folder: {root} is not a folder (set data.root to the folder of PNG/JPEG images)"
    return None


def _size(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _yaml(value: object) -> str:
    """A params value as params.yaml writes it (``null``)."""
    return "null" if value is None else str(value)


def pretrained_problem(cfg: Config) -> Optional[str]:
    """What is wrong with the published model ``train.pretrained``, or None (also when it is not set): not a
    diffusers folder, a layout this project's UNet or diffusion cannot express (naming the config key), no weights,
    or a model of other images or another T than the params' (the later stages read both from the params). Reads the
    folder's JSON configs only; the weights are read when the train stage imports them."""
    folder = cfg.train.pretrained
    if folder is None:
        return None
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

    from ddpm.diffusers_io import (DiffusersFormatError, UnsupportedLayout, diffusion_from_scheduler, locate,
                                   read_json, unet_config_from_diffusers)

    if not Path(folder).is_dir():
        return f"{folder}: not a folder; expected {PRETRAINED_LAYOUTS}"
    try:
        unet_dir, scheduler = locate(Path(folder))
        unet = unet_config_from_diffusers(read_json(unet_dir / "config.json"), unet_dir / "config.json")
        diffusion, _ = diffusion_from_scheduler(read_json(scheduler), scheduler)
    except UnsupportedLayout as e:  # a diffusers folder, of a network or schedule this project cannot express
        return str(e)
    except DiffusersFormatError as e:
        return f"{e}; expected {PRETRAINED_LAYOUTS}"
    if not any((unet_dir / name).is_file() or (unet_dir / f"{name}.index.json").is_file()
               for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)):
        return f"{unet_dir}: no weights ({SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME}); expected {PRETRAINED_LAYOUTS}"
    shape, d = (unet.image_channels, unet.image_size, unet.image_size), cfg.data
    if shape != d.shape:
        return (f"{folder} is a model of {_size(shape)} images, the params' data are {_size(d.shape)} (data.dataset "
                f"{d.dataset}, data.image_size {_yaml(d.image_size)}, data.channels {_yaml(d.channels)}); set data.* "
                f"to the model's images")
    if diffusion["timesteps"] != cfg.diffusion.timesteps:
        return (f"{folder} was trained with T = {diffusion['timesteps']} (num_train_timesteps in {scheduler}), the "
                f"params' diffusion.timesteps is {cfg.diffusion.timesteps}; set diffusion.timesteps: "
                f"{diffusion['timesteps']} (the later stages read T from the params)")
    return None


def missing_inputs(cfg: Config, stages: Iterable[str]) -> list[Missing]:
    """Every external input that one of ``stages`` will read and that is missing, one entry per file."""
    stages = list(stages)
    out: list[Missing] = []
    if "fetch" in stages:
        problem = source_problem(cfg)
        if problem:
            out.append(Missing("data.root", problem, ("fetch",)))
    if "train" in stages:
        problem = pretrained_problem(cfg)
        if problem:
            out.append(Missing("train.pretrained", problem, ("train",)))
    feature_stages = [s for s in ("evaluate", "sampler_table") if s in stages
                      and (s != "sampler_table" or cfg.sampler_table.enabled)]
    if feature_stages and planned_extractor(cfg) == INCEPTION_EXTRACTOR:
        problem = inception_problem(cfg)
        if problem:
            out.append(Missing("evaluate.inception_weights", problem, tuple(feature_stages)))
    if "evaluate" in stages and cfg.evaluate.reference and not Path(cfg.evaluate.reference).is_file():
        out.append(Missing("evaluate.reference", f"{cfg.evaluate.reference} not found (a published (mu, sigma) "
                           ".npz, e.g. from `python -m tasks.lib.refstats export`)", ("evaluate",)))
    return out


def check(cfg: Config, stages: Iterable[str], what: str = "this run") -> None:
    """Raise :class:`DataError` naming every missing external input of ``stages``, one line each."""
    missing = missing_inputs(cfg, stages)
    if not missing:
        return
    if len(missing) == 1:
        raise DataError(f"{missing[0].line()}; {what} stopped before any stage ran")
    lines = "\n".join(f"  {m.line()}" for m in missing)
    raise DataError(f"{len(missing)} inputs of {what} are missing; it stopped before any stage ran:\n{lines}")


# -- dvc repro ------------------------------------------------------------------------------------------------------
def check_for_dvc_stage(cfg: Config) -> None:
    """Under ``dvc repro`` (``DVC_STAGE`` set), check the inputs of this stage and of every stage after it, so
    that the first stage to run stops the whole reproduction over a file a later stage would miss."""
    stage = os.environ.get("DVC_STAGE", "")
    if not stage:
        return
    dvc_file, _, name = stage.rpartition(":")  # "train", or "path/dvc.yaml:train" outside the root dvc.yaml
    root = Path(os.environ.get("DVC_ROOT") or PROJECT)
    dvc_yaml = root / (dvc_file or "dvc.yaml")
    if not dvc_yaml.is_file():
        return
    stages = read_stages(dvc_yaml)
    if name not in stages:
        return
    check(cfg, downstream(name, stages), what=f"dvc repro (from stage {name})")
