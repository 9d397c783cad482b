"""One identity: every config field is marked where it is declared (result, count, report or execution, ddpm/config.py),
and every key that names a run or a reusable part of it is derived from those marks: the train run key
(tasks/lib/runkey.py), the params hash MLflow finds a run by and MLflow's params and config.* tags (tracking/run.py),
the sampling key of a shard (tasks/lib/sampling.py). Changing each field of the config in turn changes exactly the
keys its mark says."""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

import pytest

from ddpm.config import Section, result
from tasks.lib.config import Config, ConfigError, override
from tasks.lib.runkey import run_key, run_name
from tasks.lib.sampling import sampling_key
from tracking import run as tracking

SECTIONS = {name: f.annotation for name, f in Config.model_fields.items()}
ALL_FIELDS = [f"{s}.{k}" for s, cls in SECTIONS.items() for k in cls.model_fields]
# Values the generic rule below cannot guess (a new one must pass the cross checks of the tiny config).
OTHER_VALUE: dict[str, Any] = {
    "data.dataset": "mnist", "data.root": "elsewhere", "data.image_size": 16, "data.channels": 3,
    "data.holdout_fraction": 0.25,
    "data.max_train": 100, "data.ingest_workers": 2, "data.shard_images": 64,
    "model.ch": 24, "model.ch_mult": [1, 1], "model.attn_resolutions": [4], "model.num_groups": 4,
    "model.dropout": 0.1, "model.norm_eps": 1e-6,
    "diffusion.timesteps": 50, "diffusion.beta_start": 2e-4, "diffusion.beta_end": 0.03, "diffusion.cosine_s": 0.01,
    "train.batch_size": 32, "train.lr": 5e-4, "train.grad_clip": 0.5, "train.ema_decay": 0.8,
    "train.gpus_per_worker": 0.5, "train.num_workers": 2, "train.pretrained": "models/ddpm-cifar10-32",
    "sample.num_samples": 48, "sample.eta": 0.5, "sample.strength": 0.3, "sample.grid_size": 8,
    "classifier.lr": 1e-3, "evaluate.isc": True, "evaluate.inception_weights": "weights.pth",
    "evaluate.inception_sha256": "0" * 64,
    "evaluate.reference": "ref.npz", "evaluate.kid": False, "evaluate.kid_subset_size": 12,
    "figures.recon_fractions": [1.0], "sampler_table.ddim_steps": [10], "sampler_table.solvers": ["unipc"],
    "sampler_table.solver_steps": [5], "sampler_table.num_samples": 50, "sampler_table.tolerance": 0.2,
    "ray.address": "127.0.0.1:6379", "ray.num_cpus": 1, "ray.object_store_mb": 200, "ray.storage": "elsewhere",
    "tracking.uri": "http://127.0.0.1:1", "tracking.experiment": "x", "tracking.grid_sampler": "ddim",
    "tracking.register_model": "m",
}


def other_value(cfg: Config, key: str) -> Any:
    """A valid value of ``key`` other than ``cfg``'s."""
    if key in OTHER_VALUE:
        return OTHER_VALUE[key]
    section, name = key.split(".")
    value, annotation = getattr(getattr(cfg, section), name), SECTIONS[section].model_fields[name].annotation
    if isinstance(value, bool):
        return not value
    literals = [c for arg in (annotation, *get_args(annotation)) if get_origin(arg) is Literal for c in get_args(arg)]
    if literals:
        return next(c for c in literals if c != value)
    if isinstance(value, int):
        return value + 1
    raise AssertionError(f"{key}: add a value to OTHER_VALUE")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("identity") / "ckpt_00000001.pt"
    path.write_bytes(b"weights")  # the sampling key hashes the file's bytes
    return path


def keys(cfg: Config, ckpt) -> dict[str, Any]:
    return {"run_key": run_key(cfg, "sha"), "params_hash": tracking.params_hash(cfg),
            "sampling_key": sampling_key(cfg.sample, ckpt), "params": tracking.result_params(cfg),
            "tags": set(tracking.config_tags(cfg))}


def test_every_field_is_marked_once_where_it_is_declared():
    for section, cls in SECTIONS.items():
        for name in cls.model_fields:
            mark = cls.mark(name)
            assert mark["identity"] in ("result", "count", "report", "execution"), f"{section}.{name}"
            assert set(mark) <= {"identity", "when", "otherwise", "shown", "tagged"}, f"{section}.{name}"
    assert len(ALL_FIELDS) > 100  # every section's fields, not a few


def test_a_field_without_a_mark_fails():
    class Unmarked(Section):
        marked: int = result(1)
        forgotten: int = 2

    assert Unmarked().identity_of("marked") == "result"
    with pytest.raises(TypeError, match="Unmarked.forgotten has no identity mark"):
        Unmarked().identity_of("forgotten")
    with pytest.raises(TypeError, match="forgotten"):  # no key can be derived while one field is unmarked
        Unmarked().identity()


@pytest.mark.parametrize("key", ALL_FIELDS)
def test_changing_a_field_changes_exactly_the_keys_its_mark_names(key, tiny_config, ckpt):
    base = tiny_config({"model.attn_resolutions": []})  # so that other image sizes fit the network
    section, name = key.split(".")
    value = other_value(base, key)
    assert base.to_dict()[section][name] != value, key
    try:
        changed = override(base, {key: value})
    except ConfigError as e:  # the table above must hold valid values: a failure here is the test's own bug
        raise AssertionError(f"{key}: {e}") from None
    sec = getattr(base, section)
    identity, mark = sec.identity_of(name), type(sec).mark(name)
    a, b = keys(base, ckpt), keys(changed, ckpt)
    defines = identity == "result"
    assert (a["params_hash"] != b["params_hash"]) == defines, identity
    assert (a["run_key"] != b["run_key"]) == (defines and section in ("model", "diffusion", "train")), identity
    assert (a["sampling_key"] != b["sampling_key"]) == (defines and section == "sample"), identity
    assert (a["params"] != b["params"]) == bool(mark.get("shown")), mark
    tagged = (identity in ("result", "count") and not mark.get("shown")) or bool(mark.get("tagged"))
    assert (f"config.{key}" in a["tags"]) == tagged, mark


def test_the_mlflow_params_are_the_six_runs_are_compared_by(tiny_config):
    assert list(tracking.result_params(tiny_config())) == ["data.dataset", "model.ch", "train.steps", "train.lr",
                                                            "sample.sampler", "sample.steps"]
    tags = tracking.config_tags(tiny_config())
    assert {"config.train.batch_size", "config.sample.eta", "config.evaluate.repeats", "config.train.num_workers",
            "config.ray.address"} <= set(tags) and len(tags) < 90  # one MLflow log_batch takes 100 tags
    assert not any(k.startswith(("config.figures.", "config.sampler_table.", "config.tracking.")) for k in tags)


def test_train_steps_are_a_count_except_under_the_cosine_schedule(tiny_config, ckpt):
    """More steps continue a run (its checkpoints resume, its MLflow run goes on), except under the cosine schedule,
    whose decay spans train.steps: there a longer run is another curve from step 0."""
    for schedule, same in (("constant", True), ("cosine", False)):
        a, b = (tiny_config({"train.lr_schedule": schedule, "train.steps": n}) for n in (6, 12))
        assert (run_key(a, "sha") == run_key(b, "sha")) == same
        assert (tracking.params_hash(a) == tracking.params_hash(b)) == same
        assert (run_name(run_key(a, "sha")) == run_name(run_key(b, "sha"))) == same
        assert tracking.result_params(a)["train.steps"] == "6" and tracking.result_params(b)["train.steps"] == "12"


def test_a_modes_settings_count_only_in_that_mode(tiny_config, ckpt):
    """sample.strength is img2img's, sample.mask and the jumps inpainting's: in the generate mode they change no key,
    so the shards of earlier runs stay valid."""
    gen = tiny_config()
    assert gen.sample.identity_of("strength") == "execution"
    assert sampling_key(tiny_config({"sample.strength": 0.9, "sample.mask": "center"}).sample, ckpt) == \
        sampling_key(gen.sample, ckpt)
    img = tiny_config({"sample.mode": "img2img"})
    assert img.sample.identity_of("strength") == "result" and img.sample.identity_of("mask") == "execution"
    assert sampling_key(img.sample, ckpt, "in") != sampling_key(
        tiny_config({"sample.mode": "img2img", "sample.strength": 0.3}).sample, ckpt, "in")
    assert sampling_key(img.sample, ckpt, "in-a") != sampling_key(img.sample, ckpt, "in-b")  # the input images


def test_the_run_key_keeps_the_layout_stored_checkpoints_were_made_with(tiny_config):
    """run_key.json beside existing checkpoints stays valid: data hash, and the model, diffusion and learning
    params by name (JSON values), as before the marks."""
    cfg = tiny_config()
    key = run_key(cfg, "sha")
    assert key == {"data_sha256": "sha", "model": cfg.to_dict()["model"], "diffusion": cfg.to_dict()["diffusion"],
                   "train": {k: v for k, v in cfg.to_dict()["train"].items() if k in (
                       "batch_size", "lr", "warmup_steps", "lr_schedule", "grad_clip", "ema_decay", "random_flip",
                       "seed", "shuffle_buffer_mb", "loader", "precision")}}
