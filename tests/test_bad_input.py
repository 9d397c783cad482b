"""The bad-input catalog (docs/reliability.md): every invalid input ends with exit status 2, exactly one line on
stderr naming the key or file at fault and what is accepted, no traceback, and no output file changed.

The stages run in this process through ``run_cli``, exactly as ``python -m tasks.<stage>`` runs them (the
``__main__`` block is ``run_cli(main)``); two cases also go through a real subprocess, with and without --debug.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from types import SimpleNamespace

from tasks import evaluate, fetch, sample, train, train_classifier
from tasks.lib import diffusers_cli
from tasks.lib.cli import run_cli
from tasks.lib.files import write_npz

STAGES = {"fetch": fetch, "train": train, "sample": sample, "evaluate": evaluate,
          "train_classifier": train_classifier,
          # `ddpm import-diffusers` / `ddpm export-diffusers` (tasks/lib/info.py's cli runs them through run_cli too)
          "import-diffusers": SimpleNamespace(main=diffusers_cli.import_main),
          "export-diffusers": SimpleNamespace(main=diffusers_cli.export_main)}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A small project with every kind of output already present: dataset, checkpoint, samples, metrics."""
    from conftest import TINY

    root = tmp_path_factory.mktemp("project")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(TINY))
    run_cli(fetch.main, ["--params", str(params), "--out", str(root / "data")])
    (root / "ckpt").mkdir()
    (root / "ckpt" / "ckpt_00000003.pt").write_bytes(b"a checkpoint written by an earlier run")
    images = np.zeros((24, 1, 8, 8), dtype=np.uint8)
    write_npz(root / "samples" / "shard_00000.npz", images=images, seeds=np.arange(24), key=np.asarray("k"))
    (root / "metrics").mkdir()
    (root / "metrics" / "eval.json").write_text('{"fid": 1.0}\n')
    # Inputs of single cases
    (root / "not_yaml.yaml").write_text("train:\n  steps: [1, 2\n  lr: 0.1\n")
    (root / "list.yaml").write_text("- train\n- sample\n")
    (root / "empty.yaml").write_text("")
    (root / "comments_only.yaml").write_text("# every key commented out\n# train:\n#   steps: 10\n")
    (root / "empty_mapping.yaml").write_text("{}\n")
    (root / "scalar.yaml").write_text("42\n")
    (root / "misspelled_section.yaml").write_text(yaml.safe_dump({**TINY, "trian": {"steps": 10}}))
    (root / "misspelled_key.yaml").write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "learning_rate": 1}}))
    (root / "empty_images").mkdir()
    (root / "empty_images" / "notes.txt").write_text("no images here")
    bad = root / "bad_images"
    bad.mkdir()
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(buf, format="png")
    (bad / "good.png").write_bytes(buf.getvalue())
    (bad / "truncated.png").write_bytes(buf.getvalue()[:40])
    textfile = root / "text_as_image"
    textfile.mkdir()
    (textfile / "photo.jpg").write_text("this is not a JPEG")
    for name in ("a.png", "b.png"):  # readable neighbours: the folder splits, and only photo.jpg fails
        (textfile / name).write_bytes(buf.getvalue())
    (root / "not_a_folder").write_text("a file where a folder is expected")
    # An Inception weights file of the wrong shape: a state dict, but not torch-fidelity's Inception-v3.
    torch.save({"conv.weight": torch.zeros(3, 3)}, root / "wrong_inception.pth")
    corrupt = root / "corrupt_ckpt"
    corrupt.mkdir()
    (corrupt / "ckpt_00000006.pt").write_bytes(b"PK\x03\x04 truncated zip")
    # A CIFAR-10 archive whose member climbs out of data.root.
    evil = root / "evil_cifar"
    evil.mkdir()
    with tarfile.open(evil / "cifar-10-python.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    # A CIFAR-10 batch that would run code when unpickled (it would create a file).
    cifar = root / "pickled_code" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    (cifar / "data_batch_1").write_bytes(pickle.dumps(_RunsCode(str(root / "pwned")), protocol=2))
    for name in ("data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta"):
        (cifar / name).write_bytes(b"")
    _diffusers_inputs(root)
    return root


def _diffusers_inputs(root: Path) -> None:
    """Real diffusers folders in the tiny published layout, one per refusal; a valid checkpoint to export."""
    from conftest import TINY_DIFFUSERS_UNET as U, save_diffusers_pipeline
    from ddpm.checkpoint import save_checkpoint
    from ddpm.unet import UNet

    save_diffusers_pipeline(root / "hf_ok")
    for name, unet, scheduler in [
        ("hf_heads", {"attention_head_dim": 8}, None),
        ("hf_flip", {"flip_sin_to_cos": True}, None),
        ("hf_block", {"down_block_types": ("ResnetDownsampleBlock2D", "AttnDownBlock2D")}, None),
        ("hf_attn_up", {"up_block_types": ("UpBlock2D", "AttnUpBlock2D")}, None),
        ("hf_scaled", {}, {"beta_schedule": "scaled_linear"}),
        ("hf_learned", {}, {"variance_type": "learned_range"}),
        ("hf_rgb", {"in_channels": 3, "out_channels": 3}, None),
    ]:
        save_diffusers_pipeline(root / name, {**U, **unet}, scheduler)
    save_diffusers_pipeline(root / "hf_noweights")
    for f in (root / "hf_noweights" / "unet").glob("diffusion_pytorch_model.*"):
        f.unlink()
    model = UNet(1, 8, 8, (1, 2), 1, (4,), 0.0, 4)
    weights = model.state_dict()
    save_checkpoint(root / "good_ckpt" / "ckpt_00000001.pt", {
        "model": weights, "ema": {f"module.{k}": v for k, v in weights.items()}, "optimizer": {}, "step": 1,
        "config": {"model": model.config.to_dict(), "diffusion": {"timesteps": 10}}})


class _RunsCode:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _n_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# (id, stage, arguments after the stage's own paths, fragments the one line must contain)
# "{root}" is the project folder. Every case names the key or file and says what is accepted.
CASES = [
    ("steps-zero", "train", ["--set", "train.steps=0"], ["train.steps", "greater than 0"]),
    ("steps-wrong-type", "train", ["--set", "train.steps=many"], ["train.steps", "valid integer", "'many'"]),
    ("steps-float", "train", ["--set", "train.steps=2.5"], ["train.steps", "integer"]),
    ("lr-zero", "train", ["--set", "train.lr=0"], ["train.lr", "greater than 0"]),
    ("lr-negative", "train", ["--set", "train.lr=-1e-4"], ["train.lr", "greater than 0"]),
    ("batch-not-divisible", "train", ["--set", "train.num_workers=2", "--set", "train.batch_size=15"],
     ["train.batch_size", "not divisible by train.num_workers 2"]),
    ("ema-decay-one", "train", ["--set", "train.ema_decay=1.0"], ["train.ema_decay", "less than 1"]),
    ("ema-decay-negative", "train", ["--set", "train.ema_decay=-0.5"],
     ["train.ema_decay", "greater than or equal to 0"]),
    ("timesteps-one", "train", ["--set", "diffusion.timesteps=1"], ["diffusion.timesteps", "at least 2"]),
    ("timesteps-zero", "train", ["--set", "diffusion.timesteps=0"], ["diffusion.timesteps", "greater than 0"]),
    ("dropout-out-of-range", "train", ["--set", "model.dropout=1.5"], ["model.dropout", "must be in [0, 1)"]),
    ("use-gpu-wrong-type", "train", ["--set", "train.use_gpu=maybe"], ["train.use_gpu", "'auto'"]),
    ("unknown-key-override", "train", ["--set", "train.stpes=10"], ["train.stpes", "unknown key", "steps"]),
    ("unknown-key-in-file", "train", ["--params", "{root}/misspelled_key.yaml"],
     ["train.learning_rate", "unknown key", "lr"]),
    ("misspelled-section", "train", ["--params", "{root}/misspelled_section.yaml"],
     ["trian", "unknown key", "train"]),
    ("override-without-equals", "train", ["--set", "train.steps"], ["train.steps", "section.key=value"]),
    ("unknown-dataset", "fetch", ["--set", "data.dataset=imagenet"], ["data.dataset", "'digits'", "'cifar10'"]),
    ("unknown-sampler", "sample", ["--set", "sample.sampler=euler"],
     ["sample.sampler", "'ddpm'", "'ddim'", "'dpm++2m'", "'unipc'"]),
    ("zero-nfe", "sample", ["--set", "sample.sampler=unipc", "--set", "sample.steps=0"],
     ["sample.steps", "greater than 0"]),
    ("unknown-timestep-spacing", "sample", ["--set", "sample.timestep_spacing=middle"],
     ["sample.timestep_spacing", "'leading'", "'trailing'", "'linspace'"]),
    ("solver-steps-above-T", "sample", ["--set", "sample.sampler=dpm++2m", "--set", "sample.steps=5000"],
     ["sample.steps", "dpm++2m", "exceed diffusion.timesteps"]),
    ("inpaint-with-a-solver", "sample", ["--set", "sample.sampler=dpm++2m", "--set", "sample.mode=inpaint"],
     ["sample.sampler", "inpaint accepts ddpm or ddim", "dpm++2m"]),
    ("table-solver-not-a-solver", "sample", ["--set", "sampler_table.enabled=true",
                                              "--set", "sampler_table.solvers=[ddim]"],
     ["sampler_table.solvers", "dpm++2m", "unipc"]),
    ("unknown-schedule", "train", ["--set", "diffusion.schedule=quadratic"], ["diffusion.schedule", "'linear'"]),
    ("unknown-objective", "train", ["--set", "diffusion.objective=score"], ["diffusion.objective", "'eps'", "'v'"]),
    ("image-size-vs-downsampling", "train", ["--set", "data.image_size=10", "--set", "model.ch_mult=[1,2,2]"],
     ["data.image_size", "not divisible by 4"]),
    ("attention-never-occurs", "train", ["--set", "model.attn_resolutions=[3]"],
     ["model.attn_resolutions", "never occurs", "[8, 4]"]),
    ("more-gpus-than-exist", "train",
     ["--set", "train.use_gpu=true", "--set", f"train.num_workers={_n_gpus() + 1}",
      "--set", f"train.batch_size={8 * (_n_gpus() + 1)}"],
     ["train.num_workers", f"has {_n_gpus()} CUDA device"]),
    ("dataset-shape-differs", "train", ["--set", "data.image_size=16", "--set", "model.attn_resolutions=[]"],
     ["data", "dataset shape [1, 8, 8]"]),
    ("sample-count-zero", "sample", ["--set", "sample.num_samples=0"], ["sample.num_samples", "greater than 0"]),
    ("sample-count-negative", "sample", ["--set", "sample.num_samples=-8"], ["sample.num_samples", "greater than 0"]),
    ("kid-subset-above-samples", "evaluate", ["--set", "evaluate.kid_subset_size=50"],
     ["evaluate.kid_subset_size", "exceeds sample.num_samples 24"]),
    ("missing-dataset-offline", "fetch",
     ["--set", "data.dataset=mnist", "--set", "model.attn_resolutions=[]", "--set", "data.root={root}/nowhere"],
     ["mnist: missing", "train-images-idx3-ubyte", "data.download"]),
    ("image-folder-missing", "fetch",
     ["--set", "data.dataset=image-folder", "--set", "data.image_size=8", "--set", "data.root={root}/nowhere"],
     ["nowhere is not a folder", "data.root"]),
    ("image-folder-no-images", "fetch",
     ["--set", "data.dataset=image-folder", "--set", "data.image_size=8", "--set", "data.root={root}/empty_images"],
     ["no PNG or JPEG images", "empty_images"]),
    ("image-folder-corrupt-image", "fetch",
     ["--set", "data.dataset=image-folder", "--set", "data.image_size=8", "--set", "data.root={root}/bad_images"],
     ["1 unreadable image file", "truncated.png"]),
    ("image-folder-non-image-file", "fetch",
     ["--set", "data.dataset=image-folder", "--set", "data.image_size=8", "--set", "data.root={root}/text_as_image"],
     ["unreadable image file", "photo.jpg"]),
    ("archive-escapes-its-folder", "fetch",
     ["--set", "data.dataset=cifar10", "--set", "model.attn_resolutions=[]", "--set", "data.root={root}/evil_cifar"],
     ["cifar-10-python.tar.gz", "'../escaped.txt'", "outside the destination"]),
    ("cifar-batch-with-pickled-code", "fetch",
     ["--set", "data.dataset=cifar10", "--set", "model.attn_resolutions=[]", "--set", "data.root={root}/pickled_code"],
     ["data_batch_1", "not a CIFAR-10 python batch", "refusing posix.system"]),
    ("inception-weights-missing", "evaluate",
     ["--set", "evaluate.feature_extractor=inception-v3-compat", "--set", "evaluate.inception_weights={root}/none.pth"],
     ["evaluate.inception_weights", "none.pth", "not found"]),
    ("inception-weights-wrong-shape", "evaluate",
     ["--set", "evaluate.feature_extractor=inception-v3-compat",
      "--set", "evaluate.inception_weights={root}/wrong_inception.pth"],
     ["evaluate.inception_weights", "wrong_inception.pth", "expected"]),
    ("corrupt-only-checkpoint", "sample", ["--checkpoints", "{root}/corrupt_ckpt"],
     ["corrupt_ckpt", "no readable checkpoint"]),
    ("output-folder-not-writable", "fetch", ["--out", "/sys/ddpm-reliability-test/data"],
     ["/sys/ddpm-reliability-test", "not a writable folder", "choose a folder you can write to"]),
    ("output-under-a-file", "train_classifier", ["--out", "{root}/not_a_folder/clf.pt"],
     ["not_a_folder", "is a file, not a folder"]),
    ("metrics-under-a-file", "train", ["--metrics", "{root}/not_a_folder/train.json"],
     ["not_a_folder", "is a file, not a folder"]),
    ("params-not-yaml", "train", ["--params", "{root}/not_yaml.yaml"], ["not_yaml.yaml", "not valid YAML", "line"]),
    ("params-not-a-mapping", "train", ["--params", "{root}/list.yaml"], ["list.yaml", "expected a mapping"]),
    ("params-empty", "train", ["--params", "{root}/empty.yaml"], ["empty.yaml", "params file is empty",
                                                                   "mapping of sections"]),
    ("params-comments-only", "fetch", ["--params", "{root}/comments_only.yaml"],
     ["comments_only.yaml", "params file is empty"]),
    ("params-empty-mapping", "sample", ["--params", "{root}/empty_mapping.yaml"],
     ["empty_mapping.yaml", "params file is empty"]),
    ("params-scalar", "evaluate", ["--params", "{root}/scalar.yaml"], ["scalar.yaml", "expected a mapping", "int"]),
    ("params-missing", "train", ["--params", "{root}/absent.yaml"], ["absent.yaml", "params file not found"]),
    ("storage-unknown-scheme", "train", ["--set", "ray.storage=ftp://host/ray"],
     ["ray.storage", "unknown scheme 'ftp://'", "a local or NFS path", "s3://bucket/prefix"]),
    ("storage-uri-without-bucket", "train", ["--set", "ray.storage=s3://"], ["ray.storage", "no bucket named"]),
    ("storage-under-a-file", "train", ["--set", "ray.storage={root}/not_a_folder/ray"],
     ["ray.storage", "not_a_folder is a file, not a folder"]),
    ("unknown-command-line-option", "train", ["--stepz", "10"], ["unrecognized arguments: --stepz 10", "--help"]),
    # diffusers' format in and out (docs/diffusers.md): a layout our UNet or diffusion cannot express names its key
    ("diffusers-several-heads", "import-diffusers", ["{root}/hf_heads"],
     ["hf_heads/unet/config.json", "attention_head_dim", "2 heads", "one head"]),
    ("diffusers-flip-sin-to-cos", "import-diffusers", ["{root}/hf_flip"],
     ["flip_sin_to_cos: True is not expressible", "[sin, cos]"]),
    ("diffusers-other-block-type", "import-diffusers", ["{root}/hf_block"],
     ["down_block_types[0]", "'ResnetDownsampleBlock2D'", "DownBlock2D and AttnDownBlock2D"]),
    ("diffusers-attention-differs-up-and-down", "import-diffusers", ["{root}/hf_attn_up"],
     ["up_block_types", "levels [0] on the way up but [1] on the way down"]),
    ("diffusers-scaled-linear-betas", "import-diffusers", ["{root}/hf_scaled"],
     ["scheduler_config.json", "beta_schedule: 'scaled_linear' is not among this project's schedules"]),
    ("diffusers-learned-variance", "import-diffusers", ["{root}/hf_learned"],
     ["variance_type: 'learned_range'", "fixed_small"]),
    ("diffusers-folder-missing", "import-diffusers", ["{root}/nowhere"], ["nowhere: not a folder", "DDPMPipeline"]),
    ("diffusers-no-weights", "import-diffusers", ["{root}/hf_noweights"],
     ["hf_noweights/unet", "weights not loadable by diffusers"]),
    ("diffusers-bare-unet-without-scheduler", "import-diffusers", ["{root}/hf_ok/unet"],
     ["no scheduler config", "scheduler_config.json"]),
    ("import-into-a-checkpoint-folder", "import-diffusers", ["{root}/hf_ok", "--out", "{root}/ckpt"],
     ["ckpt: holds checkpoints already"]),
    ("import-negative-step", "import-diffusers", ["{root}/hf_ok", "--step", "-1"], ["--step: -1"]),
    # train.pretrained: a published model for the pipeline, checked before anything is imported (or trained)
    ("pretrained-folder-missing", "train", ["--set", "train.pretrained={root}/nowhere"],
     ["train.pretrained: {root}/nowhere: not a folder; expected a diffusers DDPMPipeline folder"]),
    ("pretrained-not-a-diffusers-folder", "train", ["--set", "train.pretrained={root}/empty_images"],
     ["train.pretrained: {root}/empty_images: no UNet config", "model_index.json, unet/, scheduler/"]),
    ("pretrained-unsupported-layout", "train", ["--set", "train.pretrained={root}/hf_heads"],
     ["train.pretrained: ", "hf_heads/unet/config.json", "attention_head_dim", "one head"]),
    ("pretrained-other-image-shape", "train", ["--set", "train.pretrained={root}/hf_rgb"],
     ["train.pretrained: ", "hf_rgb is a model of 3x8x8 images, the params' data are 1x8x8", "data.dataset digits",
      "set data.*"]),
    ("pretrained-other-timesteps", "train", ["--set", "train.pretrained={root}/hf_ok"],
     ["train.pretrained: ", "hf_ok was trained with T = 1000", "diffusion.timesteps is 100",
      "set diffusion.timesteps: 1000"]),
    ("export-corrupt-checkpoint", "export-diffusers", ["--checkpoint", "{root}/corrupt_ckpt"],
     ["corrupt_ckpt", "no readable checkpoint"]),
    ("export-missing-checkpoint", "export-diffusers", ["--checkpoint", "{root}/nowhere/ckpt_00000001.pt"],
     ["ckpt_00000001.pt: no such checkpoint file"]),
    ("export-onto-another-folder", "export-diffusers",
     ["--checkpoint", "{root}/good_ckpt", "--out", "{root}/bad_images"],
     ["bad_images: exists and is not a diffusers pipeline folder"]),
    ("export-metrics-missing", "export-diffusers",
     ["--checkpoint", "{root}/good_ckpt", "--metrics", "{root}/none.json"],
     ["none.json: no such metrics file"]),
    ("export-unknown-variance", "export-diffusers", ["--checkpoint", "{root}/good_ckpt", "--variance", "learned"],
     ["--variance", "invalid choice: 'learned'"]),
]


def _argv(stage: str, root: Path, extra: list[str]) -> list[str]:
    paths = {
        "fetch": ["--out", f"{root}/data"],
        "train": ["--data", f"{root}/data", "--checkpoints", f"{root}/ckpt", "--log", f"{root}/metrics/loss.tsv",
                  "--metrics", f"{root}/metrics/train.json"],
        "sample": ["--checkpoints", f"{root}/ckpt", "--out", f"{root}/samples"],
        "evaluate": ["--data", f"{root}/data", "--samples", f"{root}/samples", "--ref-dir", f"{root}/ref",
                     "--out", f"{root}/metrics/eval.json"],
        "train_classifier": ["--data", f"{root}/data", "--out", f"{root}/models/clf.pt",
                             "--metrics", f"{root}/metrics/clf.json"],
        "import-diffusers": ["--out", f"{root}/imported"],
        "export-diffusers": ["--out", f"{root}/hub"],
    }[stage]
    extra = [a.replace("{root}", str(root)) for a in extra]
    if stage.endswith("-diffusers"):  # `ddpm` subcommands: no params file
        return [*paths, *extra]
    # A later --out/--checkpoints/--params wins in argparse, so a case can point a path elsewhere.
    return ["--params", f"{root}/params.yaml", *paths, *extra]


def test_catalog_has_at_least_25_inputs():
    assert len(CASES) >= 25
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, project, capfd):
    name, stage, extra, fragments = case
    before = tree_hashes(project)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_cli(STAGES[stage].main, _argv(stage, project, extra))
    err = capfd.readouterr().err
    assert exc.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment.replace("{root}", str(project)) in lines[0], lines[0]
    assert tree_hashes(project) == before  # no output (nor input) touched
    assert not (project.parent / "escaped.txt").exists()
    assert not (project / "pwned").exists()


# ray.storage on object storage, against the S3 server of tests/s3.py: checked before any compute (tasks/lib/storage.py)
# with bounded timeouts. (id, what the environment and URI get wrong, fragments of the one line)
STORAGE_CASES = [
    ("storage-unreachable", "endpoint-down", ["ray.storage", "storage unreachable at http://127.0.0.1:",
                                              "Could not connect", "a local or NFS path"]),
    ("storage-no-credentials", "no-credentials", ["ray.storage", "no AWS credentials found", "AWS_ACCESS_KEY_ID",
                                                  "a local or NFS path"]),
    ("storage-bucket-missing", "no-bucket", ["ray.storage", "s3://absent-bucket/ray", "bucket 'absent-bucket' does "
                                             "not exist at http://127.0.0.1:", "a local or NFS path"]),
]


@pytest.mark.parametrize("case", STORAGE_CASES, ids=[c[0] for c in STORAGE_CASES])
def test_bad_storage_is_one_line_exit_2_and_changes_nothing(case, project, s3_server, monkeypatch, capfd):
    from conftest import free_port
    from s3 import AWS_VARIABLES

    name, fault, fragments = case
    bucket = s3_server.bucket("ray")
    env = s3_server.env(credentials=fault != "no-credentials")
    if fault == "endpoint-down":  # a port nothing listens on
        env["AWS_ENDPOINT_URL_S3"] = env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    for key in AWS_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    uri = "s3://absent-bucket/ray" if fault == "no-bucket" else f"{bucket.url}/ray"
    before = tree_hashes(project)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_cli(train.main, _argv("train", project, ["--set", f"ray.storage={uri}"]))
    err = capfd.readouterr().err
    assert exc.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ray.storage: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert tree_hashes(project) == before
    assert bucket.keys() == []  # nothing written to the storage either


def test_real_cli_one_line_and_debug_shows_the_traceback(project, repo_root):
    argv = [sys.executable, "-m", "tasks.train", *_argv("train", project, ["--set", "train.ema_decay=1.5"])]
    plain = subprocess.run(argv, cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [
        "error: train.ema_decay: input should be less than 1, got 1.5"]
    debug = subprocess.run([*argv, "--debug"], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert debug.returncode == 2
    assert "Traceback (most recent call last)" in debug.stderr
    assert "ConfigError" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip()


def test_file_system_errors_are_one_line_too(capfd):
    """An OSError that reaches the command line (a folder that turned read-only mid-run, a full disk) is one line
    naming the path, not a traceback."""

    def main(argv):
        with open("/sys/ddpm-reliability-test.json", "w") as f:  # sysfs: no new files, even for root
            f.write("{}")

    with pytest.raises(SystemExit) as exc:
        run_cli(main, [])
    err = capfd.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: /sys/ddpm-reliability-test.json: ")
    assert "choose a folder you can write to" in err[0] or "writable" in err[0]


def test_the_errors_a_worker_raises_reach_the_driver_as_they_were():
    """Ray pickles an error raised in a worker (a Ray Train worker, a sampling task) to send it to the driver. Each of
    the project's errors comes back as the same class with the same line and fields, not as Ray's TypeError about a
    missing argument (seen from a restarted Ray Train worker that met a torn checkpoint)."""
    from ddpm.checkpoint import CheckpointError
    from ddpm.config import ConfigError
    from ddpm.diffusers_io import DiffusersFormatError, UnsupportedLayout
    from ddpm.unet import UNetConfigError
    from tasks.lib.errors import DataError, StageError
    from tasks.lib.storage import StorageError

    errors = [
        (CheckpointError("/run/ckpt_00000012.pt", "unreadable"), {"path": Path("/run/ckpt_00000012.pt")}),
        (ConfigError("train.lr", "must be > 0"), {"key": "train.lr"}),
        (StorageError("s3://b/ray", "no such bucket"), {"key": "ray.storage"}),
        (UNetConfigError("ch_mult", "empty"), {"field": "ch_mult"}),
        (DiffusersFormatError("model/config.json", "not JSON"), {"path": "model/config.json"}),
        (UnsupportedLayout("act_fn", "only silu", "model/config.json"), {"key": "act_fn", "path": "model/config.json"}),
        (DiffusersFormatError(None, "no model"), {"path": None}),
        (StageError("data/x.parquet: missing"), {}),
        (DataError("data/x.parquet: missing"), {}),
    ]
    for error, fields in errors:
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error), (error, back)
        assert {k: getattr(back, k) for k in fields} == fields, error
    assert str(errors[2][0]) == "ray.storage: s3://b/ray: no such bucket"
