"""Typed configuration: defaults, YAML differences, --set overrides, type and range checks."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from captioning.config import (
    Config,
    ConfigError,
    build_config,
    flatten,
    from_dict,
    merge,
    parse_override,
    save_yaml,
    to_dict,
    validate,
)


def write_yaml(tmp_path, data, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


# ------------------------------------------------------------------------------ defaults, files


def test_defaults_validate():
    cfg = build_config()
    assert cfg == Config()
    assert validate(Config()) == Config()
    assert cfg.model.encoder.weights == "none"  # the default never downloads


def test_yaml_file_overrides_only_its_differences(tmp_path):
    path = write_yaml(tmp_path, {"model": {"attention": "hard", "decoder": {"hidden_dim": 64}},
                                 "optim": {"lr": 0.0004}})
    cfg = build_config(path)
    assert cfg.model.attention == "hard"
    assert cfg.model.decoder.hidden_dim == 64
    assert cfg.optim.lr == 0.0004
    expected = Config()
    expected = dataclasses.replace(
        expected,
        model=dataclasses.replace(expected.model, attention="hard",
                                  decoder=dataclasses.replace(expected.model.decoder, hidden_dim=64)),
        optim=dataclasses.replace(expected.optim, lr=0.0004),
    )
    assert cfg == expected  # everything else kept its default


def test_overrides_apply_after_the_file_in_order(tmp_path):
    path = write_yaml(tmp_path, {"optim": {"lr": 0.5}})
    cfg = build_config(path, ["optim.lr=0.25", "model.decoder.score=dot", "optim.lr=0.125"])
    assert cfg.optim.lr == 0.125
    assert cfg.model.decoder.score == "dot"


def test_empty_yaml_file_is_the_defaults(tmp_path):
    assert build_config(write_yaml(tmp_path, "")) == Config()


def test_missing_or_invalid_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        build_config(write_yaml(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError) as err:
        build_config(write_yaml(tmp_path, "model: [unclosed\n"))
    assert "\n" not in str(err.value)


def test_a_key_written_twice_is_refused_naming_it_and_its_line(tmp_path):
    """YAML keeps the last of two equal keys: a second train: section silently dropped the first."""
    path = write_yaml(tmp_path, "train: {max_epochs: 3}\noptim: {lr: 0.001}\ntrain: {patience: 2}\n", "dup.yaml")
    with pytest.raises(ConfigError) as err:
        build_config(path)
    message = str(err.value)
    assert "dup.yaml" in message and "'train'" in message and "line 3" in message and "\n" not in message
    with pytest.raises(ConfigError) as err:
        build_config(overrides=["train={max_epochs: 3, max_epochs: 4}"])
    assert "'max_epochs'" in str(err.value) and "twice" in str(err.value) and "\n" not in str(err.value)
    assert build_config(write_yaml(tmp_path, "train: {max_epochs: 3, patience: 2}\n")).train.max_epochs == 3


def test_save_yaml_round_trip(tmp_path):
    cfg = build_config(overrides=["model.attention=hard", "model.encoder.stage=null", "optim.lr=0.01"])
    path = tmp_path / "saved.yaml"
    save_yaml(cfg, path)
    assert build_config(path) == cfg


# ------------------------------------------------------------------------------ unknown keys


def test_unknown_key_in_yaml_names_the_full_dotted_key(tmp_path):
    path = write_yaml(tmp_path, {"model": {"decoder": {"hiden_dim": 64}}})
    with pytest.raises(ConfigError, match=r"model\.decoder\.hiden_dim"):
        build_config(path)
    path = write_yaml(tmp_path, {"modle": {"attention": "hard"}}, "top.yaml")
    with pytest.raises(ConfigError, match="'modle'"):
        build_config(path)


def test_unknown_key_in_override_names_the_full_dotted_key():
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        build_config(overrides=["optim.learning_rate=0.1"])
    with pytest.raises(ConfigError, match=r"model\.encoder\.backbone_name"):
        build_config(overrides=["model.encoder.backbone_name=resnet50"])


def test_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match=r"model\.decoder"):
        merge(Config(), {"model": {"decoder": 3}})
    with pytest.raises(ConfigError, match="model"):
        build_config(overrides=["model=soft"])


# ------------------------------------------------------------------------------ types


@pytest.mark.parametrize(
    "updates, key",
    [
        ({"model": {"decoder": {"hidden_dim": "big"}}}, "model.decoder.hidden_dim"),
        ({"data": {"batch_size": 3.5}}, "data.batch_size"),
        ({"optim": {"lr": [0.1, 0.2]}}, "optim.lr"),
        ({"optim": {"lr": "fast"}}, "optim.lr"),
        ({"train": {"fast_dev_run": "yes"}}, "train.fast_dev_run"),
        ({"train": {"devices": True}}, "train.devices"),  # a bool is not an int here
        ({"loss": {"entropy": False}}, "loss.entropy"),
        ({"data": {"root": 5}}, "data.root"),
        ({"model": {"encoder": {"stage": 4}}}, "model.encoder.stage"),
        ({"model": {"decoder": {"embed_dim": None}}}, "model.decoder.embed_dim"),  # None only where typed
    ],
)
def test_wrong_type_names_the_key(updates, key):
    with pytest.raises(ConfigError) as err:
        merge(Config(), updates)
    assert f"'{key}'" in str(err.value)


def test_int_is_accepted_for_float():
    cfg = merge(Config(), {"optim": {"lr": 1}, "loss": {"doubly_stochastic": 0}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert isinstance(cfg.loss.doubly_stochastic, float)


@pytest.mark.parametrize(
    "key, good, bad",
    [
        ("model.attention", "hard", "medium"),
        ("model.decoder.score", "bilinear", "cosine"),
        ("model.decoder.gate", "vector", "matrix"),
        ("loss.substitution", "image", "pixel"),
        ("decode.hard_mode", "argmax", "beam"),
        ("data.dataset", "coco", "flickr"),
    ],
)
def test_literal_choices_are_enforced(key, good, bad):
    cfg = build_config(overrides=[f"{key}={good}"])
    section, name = key.rsplit(".", 1)
    node = cfg
    for part in section.split("."):
        node = getattr(node, part)
    assert getattr(node, name) == good
    with pytest.raises(ConfigError) as err:
        build_config(overrides=[f"{key}={bad}"])
    assert f"'{key}'" in str(err.value) and bad in str(err.value)


def test_none_allowed_where_typed_optional():
    cfg = build_config(overrides=["model.encoder.stage=null", "model.encoder.fine_tune_from=null"])
    assert cfg.model.encoder.stage is None and cfg.model.encoder.fine_tune_from is None
    cfg = merge(Config(), {"model": {"encoder": {"stage": "layer3"}}})
    assert cfg.model.encoder.stage == "layer3"


# ------------------------------------------------------------------------------ parse_override


def test_parse_override_nested_keys_and_yaml_types():
    assert parse_override("model.decoder.dropout=0.3") == {"model": {"decoder": {"dropout": 0.3}}}
    assert parse_override("train.fast_dev_run=true") == {"train": {"fast_dev_run": True}}
    assert parse_override("model.encoder.stage=null") == {"model": {"encoder": {"stage": None}}}
    assert parse_override("data.batch_size=16") == {"data": {"batch_size": 16}}
    assert parse_override("optim.lr=0.001") == {"optim": {"lr": 0.001}}
    assert parse_override("data.root=a=b") == {"data": {"root": "a=b"}}  # split at the first '='
    assert parse_override(" optim.lr = 0.5") == {"optim": {"lr": 0.5}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("optim.lr")


def test_parse_override_reads_exponent_floats():
    # YAML 1.1 parses "1e-3" as a string; the float field converts it when merged.
    assert build_config(overrides=["optim.lr=1e-3"]).optim.lr == pytest.approx(1e-3)


# ------------------------------------------------------------------------------ validate


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.batch_size=0", "data.batch_size"),
        ("data.captions_per_image=-1", "data.captions_per_image"),
        ("model.encoder.grid_size=0", "model.encoder.grid_size"),
        ("model.decoder.hidden_dim=0", "model.decoder.hidden_dim"),
        ("decode.max_len=0", "decode.max_len"),
        ("model.decoder.dropout=1.0", "model.decoder.dropout"),
        ("model.decoder.dropout=-0.1", "model.decoder.dropout"),
        ("loss.expected_context_prob=1.5", "loss.expected_context_prob"),
        ("loss.baseline_decay=1.0", "loss.baseline_decay"),
    ],
)
def test_validate_range_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        build_config(overrides=[override])
    assert f"'{key}'" in str(err.value)


def test_validation_less_often_than_the_run_is_long_is_refused():
    """No validation would ever run: no best checkpoint, and the test split's "best" had nothing to load."""
    with pytest.raises(ConfigError) as err:
        build_config(overrides=["train.val_every=5", "train.max_epochs=1"])
    message = str(err.value)
    assert "'train.val_every'" in message and "train.max_epochs" in message and "\n" not in message
    assert build_config(overrides=["train.val_every=3", "train.max_epochs=3"]).train.val_every == 3


def test_validate_accepts_range_edges():
    cfg = build_config(overrides=["model.decoder.dropout=0", "loss.expected_context_prob=1",
                                  "loss.baseline_decay=0", "loss.expected_context_prob=0"])
    assert cfg.loss.expected_context_prob == 0.0


# ------------------------------------------------------------------------------ dict round trip


def test_to_dict_from_dict_round_trip():
    cfg = build_config(overrides=["model.attention=hard", "model.encoder.stage=null", "optim.lr=0.01",
                                  "data.dataset=coco", "train.fast_dev_run=true"])
    data = to_dict(cfg)
    assert isinstance(data, dict) and isinstance(data["model"]["encoder"], dict)
    assert from_dict(data) == cfg
    assert to_dict(from_dict(data)) == data
    assert from_dict({}) == Config()
    # Plain types only (checkpoints hold this dict and load with weights_only=True).
    assert yaml.safe_load(yaml.safe_dump(data)) == data


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_yaml_file_reads_exponent_floats(tmp_path):
    path = write_yaml(tmp_path, "optim:\n  lr: 1e-4\n  encoder_lr: 5e-5\n")
    cfg = build_config(path)
    assert cfg.optim.lr == pytest.approx(1e-4) and cfg.optim.encoder_lr == pytest.approx(5e-5)


# ------------------------------------------------------------------------------ the COCO configs


REPO_CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["coco_soft.yaml", "coco_hard.yaml", "coco_resnet101_soft.yaml", "coco_soft_arctic.yaml",
                                  "coco_hard_arctic.yaml"])
def test_coco_configs_use_the_authors_effective_lambda(name):
    """capgen: alpha_c * mean over L locations, summed over B captions -> alpha_c * B / L per caption."""
    cfg = build_config(REPO_CONFIGS / name)
    grid = cfg.model.encoder.grid_size
    captions = cfg.data.batch_size * cfg.data.captions_per_image
    assert cfg.loss.doubly_stochastic == pytest.approx(1.0 * captions / grid**2, abs=5e-5)
    # The authors' REINFORCE and entropy strength only where a config follows their code.
    assert cfg.loss.hard_reduction == ("sum" if name == "coco_hard_arctic.yaml" else "mean")


def test_resnet101_config_has_a_native_grid():
    """ResNet-101's layer4 has stride 32: the image must give at least grid_size cells per side."""
    cfg = build_config(REPO_CONFIGS / "coco_resnet101_soft.yaml")
    assert cfg.model.encoder.stage == "layer4"
    assert cfg.data.image_size // 32 >= cfg.model.encoder.grid_size


def test_every_field_has_a_range_or_choices():
    """One validation of every config the project loads: every number has a range, every free
    string its choices or a path rule (a new number is declared with its range: config.bounded)."""
    import typing

    from captioning import config as module

    paths = {"model.encoder.weights", "data.root", "data.feature_cache"}
    choices = {"model.encoder.backbone", "model.encoder.stage", "model.encoder.fine_tune_from", "train.accelerator",
               "train.precision"}
    for key, value in flatten(to_dict(Config())).items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            assert key in module.RANGES, f"{key} has no range: declare it with config.bounded"
        else:
            section, name = key.rsplit(".", 1)
            node = Config()
            for part in section.split("."):
                node = getattr(node, part)
            literal = typing.get_origin(typing.get_type_hints(type(node))[name]) is typing.Literal
            assert literal or key in paths | choices, f"{key} has no choices"


@pytest.mark.parametrize("override, message", [
    ("data.num_workers=-1", "'data.num_workers' must be >= 0"),
    ("train.limit_train_batches=-1", "'train.limit_train_batches' must be positive"),
    ("train.limit_train_batches=0", "'train.limit_train_batches' must be positive"),
    ("train.accelerator=tpu", "'train.accelerator' is 'tpu', not one of auto, cpu"),
    ("model.encoder.backbone=nope", "'model.encoder.backbone' is 'nope', not one of resnet18"),
    ("model.encoder.stage=layer9", "'model.encoder.stage' is 'layer9', not one of null, stem"),
    ("data.synthetic.num_train=-3", "'data.synthetic.num_train' must be positive"),
    ("data.synthetic.captions_per_image=0", "'data.synthetic.captions_per_image' must be positive"),
    ("model.decoder.hidden_dim=1000000", "'model.decoder.hidden_dim' must be at most 8,192"),
    ("data.eval_batch_size=100000000000000000000", "'data.eval_batch_size' must be at most 65,536"),
    ("train.seed=-1", "'train.seed' must be >= 0"),
    ("model.encoder.fine_tune_from=layer4", "not one of the kept stages of resnet18"),
    ("optim.lr=[", "the value is not valid YAML"),
])
def test_every_value_is_bounded_before_anything_is_allocated(override, message):
    """These --set values gave tracebacks, some only after a 16 TB allocation was tried."""
    with pytest.raises(ConfigError) as err:
        build_config(overrides=[override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_names_the_command_lines_offer_are_the_configs_and_the_models():
    """config.py's name tuples (read by every --help without importing torch) are the Literals of
    the config and the registries of captioning/models/attention.py."""
    import typing

    from captioning.config import (ATTENTIONS, COMPILE_TARGETS, HARD_MODES, DecodeConfig, DecoderConfig, ModelConfig,
                                   TrainConfig)
    from captioning.models.attention import MECHANISMS, SCORES, HardAttention

    def literal(cls, key):
        return typing.get_args(typing.get_type_hints(cls)[key])

    assert literal(ModelConfig, "attention") == ATTENTIONS == tuple(MECHANISMS)
    assert literal(DecodeConfig, "hard_mode") == HARD_MODES == HardAttention.test_modes
    assert literal(TrainConfig, "compile") == COMPILE_TARGETS
    assert literal(DecoderConfig, "score") == tuple(SCORES)
