"""The configuration tree (tasks/lib/config.py, over ddpm/config.py's sections): defaults, overrides, frozen sections,
errors naming the dotted key."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import ValidationError

from tasks.lib.config import (
    Config,
    ConfigError,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_config,
    parse_override,
    read_yaml,
    write_resolved,
)
from ddpm.unet import UNetConfig


def error_of(raw) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        from_dict(raw)
    return exc.value


# -- defaults and overrides --------------------------------------------------------------------------------------


def test_the_defaults_are_params_yaml(repo_root):
    """One home for every value: the classes' defaults are the digits preset, params.yaml, key for key (a section
    built alone, ModelConfig() say, is the preset's too)."""
    cfg = from_dict({})
    assert isinstance(cfg, Config)
    assert load_config(None) == cfg == Config() == load_config(repo_root / "params.yaml")
    assert cfg.to_dict() == load_config(repo_root / "params.yaml").to_dict()
    assert ModelConfig() == cfg.model and TrainConfig().lr == 0.002
    d = cfg.diffusion
    assert (d.schedule, d.timesteps, d.cosine_s, d.objective) == ("cosine", 1000, 0.008, "eps")
    assert cfg.data.shape == (1, 8, 8)  # digits, native size
    assert cfg.unet_config() == UNetConfig(1, 8, cfg.model.ch, cfg.model.ch_mult, cfg.model.num_res_blocks,
                                           cfg.model.attn_resolutions, cfg.model.dropout, cfg.model.num_groups)


def test_tiny_config_fixture_and_overrides(tiny_config):
    cfg = tiny_config({"train.steps": 3, "model.ch_mult": [1, 2, 2], "diffusion.schedule": "cosine"})
    assert cfg.train.steps == 3
    assert cfg.model.ch_mult == (1, 2, 2) and isinstance(cfg.model.ch_mult, tuple)
    assert cfg.diffusion.schedule == "cosine"
    assert cfg.model.ch == 16  # untouched tiny values stay
    assert tiny_config().train.steps == 6


def test_load_config_reads_yaml_then_applies_string_overrides(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"lr": 5e-4, "steps": 10}, "sample": {"sampler": "ddpm"}}))
    cfg = load_config(params, ["train.lr=1e-4", "model.ch_mult=[1,2]", "train.random_flip=true"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 10
    assert cfg.model.ch_mult == (1, 2)
    assert cfg.train.random_flip is True
    assert cfg.sample.sampler == "ddpm"


def test_apply_overrides_copies_and_accepts_a_mapping():
    raw = {"train": {"steps": 5}}
    out = apply_overrides(raw, {"train.steps": 7, "sample.eta": 0.5})
    assert out == {"train": {"steps": 7}, "sample": {"eta": 0.5}}
    assert raw == {"train": {"steps": 5}}
    assert apply_overrides(raw, None) == raw and apply_overrides(None, []) == {}


@pytest.mark.parametrize(
    "override,key",
    [("train.nope=1", "train.nope"), ("nope.steps=1", "nope.steps"), ("train=1", "train"),
     ("train.lr.x=1", "train.lr.x")],
)
def test_bad_override_keys_named(override, key):
    with pytest.raises(ConfigError) as exc:
        apply_overrides({}, [override])
    assert exc.value.key == key


@pytest.mark.parametrize(
    "text,expected",
    [
        ("train.lr=1e-4", ("train.lr", 1e-4)),
        ("train.lr=2E-4", ("train.lr", 2e-4)),
        ("train.lr=1.5e-3", ("train.lr", 1.5e-3)),
        ("sample.eta=.5", ("sample.eta", 0.5)),
        ("train.steps=10", ("train.steps", 10)),
        (" train.steps = 12", ("train.steps", 12)),
        ("model.ch_mult=[1,2,2]", ("model.ch_mult", [1, 2, 2])),
        ("model.attn_resolutions=[]", ("model.attn_resolutions", [])),
        ("data.download=true", ("data.download", True)),
        ("data.download=True", ("data.download", True)),
        ("data.download=false", ("data.download", False)),
        ("train.use_gpu=auto", ("train.use_gpu", "auto")),
        ("data.dataset=image-folder", ("data.dataset", "image-folder")),
        ("data.root=./data/raw", ("data.root", "./data/raw")),
        ("data.root=a=b", ("data.root", "a=b")),
        ("evaluate.inception_weights=null", ("evaluate.inception_weights", None)),
        ("evaluate.inception_weights=", ("evaluate.inception_weights", None)),
    ],
)
def test_parse_override(text, expected):
    key, value = parse_override(text)
    assert (key, value) == expected
    assert type(value) is type(expected[1])


def test_parse_override_needs_an_equals_sign():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.lr")


# -- errors name the dotted key ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw,key,fragment",
    [
        # unknown keys, listing the known ones
        ({"train": {"lrr": 1}}, "train.lrr", "known keys of train: steps"),
        ({"trian": {}}, "trian", "known keys: data, model"),
        ({"model": {"width": 3}}, "model.width", "num_res_blocks"),
        # wrong types
        ({"train": {"lr": "fast"}}, "train.lr", "'fast'"),
        ({"train": {"steps": 1.5}}, "train.steps", "integer"),
        ({"data": {"download": "yes"}}, "data.download", "boolean"),
        ({"model": {"ch_mult": [1, "x"]}}, "model.ch_mult.1", "integer"),
        ({"train": 5}, "train", "dictionary"),
        ({"train": {"use_gpu": "maybe"}}, "train.use_gpu", "'auto'"),
        # out of range
        ({"train": {"lr": -1}}, "train.lr", "greater than 0"),
        ({"train": {"lr": 0}}, "train.lr", "greater than 0"),
        ({"model": {"dropout": 1.0}}, "model.dropout", "must be in [0, 1), got 1.0"),
        ({"model": {"ch": 0}}, "model.ch", "must be a positive integer, got 0"),
        ({"train": {"ema_decay": 1.0}}, "train.ema_decay", "less than 1"),
        ({"diffusion": {"timesteps": 0}}, "diffusion.timesteps", "greater than 0"),
        ({"data": {"holdout_fraction": 1.0}}, "data.holdout_fraction", "less than 1"),
        ({"ray": {"object_store_mb": 10}}, "ray.object_store_mb", "78"),
        ({"evaluate": {"kid_subset_size": 1}}, "evaluate.kid_subset_size", "greater than 1"),
        # bad enums, listing the choices
        ({"data": {"dataset": "imagenet"}}, "data.dataset", "'cifar10'"),
        ({"sample": {"sampler": "euler"}}, "sample.sampler", "'ddim'"),
        ({"diffusion": {"schedule": "quadratic"}}, "diffusion.schedule", "'cosine'"),
        ({"diffusion": {"objective": "score"}}, "diffusion.objective", "'v'"),
        ({"sample": {"variance": "learned"}}, "sample.variance", "'fixedsmall'"),
        ({"data": {"channels": 2}}, "data.channels", "1"),
        # UNet structure, mapped onto the keys a user sets
        ({"model": {"ch_mult": [1, 2, 2, 2, 2]}}, "data.image_size", "not divisible by 16"),
        ({"data": {"dataset": "image-folder", "image_size": 30}}, "data.image_size", "not divisible by 4"),
        ({"model": {"attn_resolutions": [3]}}, "model.attn_resolutions", "never occurs"),
        ({"model": {"num_groups": 5}}, "model.num_groups", "do not divide"),
        ({"model": {"ch": 40}}, "model.num_groups", "40 channels"),
        # cross checks
        ({"evaluate": {"kid_subset_size": 500}}, "evaluate.kid_subset_size", "sample.num_samples"),
        ({"sample": {"steps": 2000}}, "sample.steps", "diffusion.timesteps"),
        ({"diffusion": {"timesteps": 10}}, "sample.steps", "20 dpm++2m-sde steps exceed diffusion.timesteps 10"),
        ({"diffusion": {"schedule": "linear", "beta_start": 0.1, "beta_end": 0.01}}, "diffusion.beta_start",
         "diffusion.beta_end"),
        ({"data": {"dataset": "image-folder"}}, "data.image_size", "image-folder"),
        # the form of a path only (a missing folder is an input error, tests/test_inputs.py)
        ({"train": {"pretrained": " "}}, "train.pretrained", "empty; null (train the model) or a diffusers"),
    ],
)
def test_errors_name_the_dotted_key(raw, key, fragment):
    e = error_of(raw)
    assert e.key == key
    assert str(e).startswith(f"{key}: ")
    assert fragment in str(e)
    assert "\n" not in str(e)  # one readable line
    assert isinstance(e, ValueError)


@pytest.mark.parametrize(
    "raw",
    [
        {"evaluate": {"kid_subset_size": 2000, "kid": False}},  # KID off: no minimum sample count
        {"sample": {"steps": 2000, "sampler": "ddpm"}},  # DDPM ignores sample.steps
        {"sample": {"steps": 1000}},
        {"diffusion": {"schedule": "cosine", "beta_start": 0.1, "beta_end": 0.01}},  # betas unused by cosine
        {"data": {"dataset": "cifar10"}, "model": {"ch_mult": [1, 2, 2, 2], "attn_resolutions": [16]}},
    ],
)
def test_valid_edge_configs(raw):
    from_dict(raw)


def test_non_mapping_params_rejected():
    assert error_of([1, 2]).key == "params"
    assert isinstance(from_dict(None), Config)


# -- frozen and serialisable ---------------------------------------------------------------------------------------


def test_config_is_frozen(tiny_config):
    cfg = tiny_config()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.lr = 1.0
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train = cfg.sample
    assert cfg.train.lr == 1e-3
    assert isinstance(cfg.model.ch_mult, tuple)  # no mutable lists inside either
    assert hash(cfg.model.ch_mult) is not None


def test_round_trips_through_json(tiny_config, tmp_path):
    cfg = tiny_config({"train.use_gpu": "auto", "evaluate.isc": False})
    again = from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    path = write_resolved(cfg, tmp_path / "out")
    assert json.loads(path.read_text()) == cfg.to_dict()
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]


def test_override_validates_and_leaves_the_original_as_it_was(tiny_config):
    """An in-memory variant of a config (the sampler table's rows): the cross checks run again, errors name the key,
    the unchanged sections are the same objects."""
    from tasks.lib.config import override

    cfg = tiny_config()
    row = override(cfg, {"sample.sampler": "ddpm", "sample.num_samples": 12, "evaluate.repeats": 1})
    assert (row.sample.sampler, row.sample.num_samples) == ("ddpm", 12) and cfg.sample.sampler == "ddim"
    assert row.model is cfg.model and row.train is cfg.train
    assert row == tiny_config({"sample.sampler": "ddpm", "sample.num_samples": 12})
    with pytest.raises(ConfigError, match=r"^evaluate.kid_subset_size: 10 exceeds sample.num_samples 5"):
        override(cfg, {"sample.num_samples": 5})
    with pytest.raises(ConfigError, match=r"^sample.steps: input should be greater than 0, got -1"):
        override(cfg, ["sample.steps=-1"])
    with pytest.raises(ConfigError, match="unknown key; known keys of sample"):
        override(cfg, {"sample.stepz": 3})


def test_the_config_crosses_to_workers_as_itself(tiny_config):
    """Ray pickles the frozen Config to its workers: what arrives equals what was sent, no dict in between."""
    import pickle

    cfg = tiny_config({"train.lr": 3e-4})
    again = pickle.loads(pickle.dumps(cfg))
    assert again == cfg and type(again.train) is type(cfg.train) and again.train.lr == 3e-4


@pytest.mark.parametrize(
    "data,shape",
    [({"dataset": "digits"}, (1, 8, 8)), ({"dataset": "mnist"}, (1, 28, 28)), ({"dataset": "cifar10"}, (3, 32, 32)),
     ({"dataset": "image-folder", "image_size": 16}, (3, 16, 16)),
     ({"dataset": "image-folder", "image_size": 16, "channels": 1}, (1, 16, 16)),
     ({"dataset": "digits", "image_size": 16}, (1, 16, 16))],
)
def test_data_shape_and_unet_config(data, shape):
    model = {"ch": 16, "ch_mult": [1, 2], "attn_resolutions": [], "num_groups": 8}
    cfg = from_dict({"data": data, "model": model})
    assert cfg.data.shape == shape
    u = cfg.unet_config()
    assert (u.image_channels, u.image_size) == shape[:2]


# -- reading params files ------------------------------------------------------------------------------------------


def test_read_yaml_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as exc:
        read_yaml(missing)
    assert exc.value.key == str(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        read_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_yaml(listy)
    # An empty file (or only comments, or {}) is refused: it would run every stage on the built-in defaults.
    for text in ("", "# train:\n#   steps: 10\n", "{}\n"):
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        with pytest.raises(ConfigError, match="params file is empty") as exc:
            read_yaml(empty)
        assert exc.value.key == str(empty)
    assert load_config(None) == from_dict({})  # no file at all: the defaults, on purpose


@pytest.mark.parametrize("value", ["s3://bucket/ddpm/ray", "gs://bucket/ray", "gcs://bucket", "abfs://c@acct/ray",
                                   "hdfs://namenode:8020/ray", "file:///mnt/nfs/ray", "/mnt/nfs/ddpm/.ray_results",
                                   ".ray_results", "~/ray"])
def test_ray_storage_takes_a_path_or_a_uri_pyarrow_opens(value):
    assert from_dict({"ray": {"storage": value}}).ray.storage == value  # kept as written; no I/O at validation


@pytest.mark.parametrize("value, says", [("ftp://host/ray", "unknown scheme 'ftp://'"),
                                         ("mock://ray", "unknown scheme 'mock://'"),
                                         ("s3://", "no bucket named"), ("gs:///ray", "no bucket named"),
                                         ("", "empty"), ("   ", "empty")])
def test_ray_storage_refuses_what_pyarrow_cannot_open(value, says):
    e = error_of({"ray": {"storage": value}})
    assert e.key == "ray.storage"
    assert says in str(e) and "a local or NFS path, or a URI of a file system pyarrow opens" in str(e), str(e)


def test_ray_storage_goes_to_ray_as_a_uri_or_an_absolute_path(tmp_path, monkeypatch):
    from tasks.lib.storage import storage_path

    monkeypatch.chdir(tmp_path)
    assert storage_path("s3://bucket/ray") == "s3://bucket/ray"
    assert storage_path(".ray_results") == str(tmp_path / ".ray_results")  # Ray workers change directory
