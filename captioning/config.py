"""Typed configuration: dataclasses whose defaults train on the synthetic dataset in minutes on a
CPU; the paper's COCO settings are differences from them in ``configs/*.yaml``. Every way a config
enters (a YAML file, ``--set key=value``, a checkpoint) goes through :func:`merge` (unknown keys and
wrong types refused, naming the key) and :func:`validate` (ranges and choices)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from captioning.console import CaptioningError, one_line
from captioning.files import atomic_write


class ConfigError(CaptioningError, ValueError):
    """A config key is unknown, has the wrong type, or a value is out of range."""


# The names of things the command lines offer, here so that every --help answers without
# importing torch (tests/test_config.py holds each equal to its user), and the config's choices.
#: Attention mechanisms (model.attention; captioning/models/attention.py MECHANISMS).
ATTENTIONS = ("soft", "hard", "none")
#: How a hard-attention model may attend at test time (Sec. 4.2): the expected context (the
#: authors' default), its single most likely location, or a sampled one.
HARD_MODES = ("expected", "argmax", "sample")
#: What torch.compile compiles (train.compile; captioning/perf/compile.py).
COMPILE_TARGETS = ("none", "step", "model")
#: The logs ``captioning train --logger`` writes: the CSV log (logs/metrics.csv) always, TensorBoard too.
LOGGERS = ("csv", "tensorboard")


class Range(typing.NamedTuple):
    """The values a number may take: ``low`` .. ``high``, each end closed unless said open."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    why: str = ""  # why the upper bound, for the message


# Sizes are bounded far above any setting that trains (the paper's COCO model: LSTM 1800, 14x14
# grid, 64 images a batch) and far below one that would try to allocate terabytes.
_LAYER = Range(1, 8192, why="a wider layer needs more memory than a GPU has")
_COUNT = Range(1, 10**7, why="ten million")
_FRACTION = Range(0, 1, low_open=True)


def bounded(default: float, rule: Range):
    """A numeric setting's default and the values it may take (:func:`validate` checks them)."""
    return field(default=default, metadata={"range": rule})


@dataclass
class EncoderConfig:
    backbone: str = "resnet18"  # any of BACKBONES
    # Last stage kept; None = conv5 (resnet layer4, VGG conv5_4 before max-pool). layer2: stride 8,
    # an 8x8 grid from 64x64 images.
    stage: str | None = "layer2"
    grid_size: int = bounded(8, Range(1, 64, why="the paper's grid is 14x14"))  # L = grid_size^2 (paper: 196)
    # "none" (random init), "imagenet" (torchvision weights API), or a path to a state-dict file.
    weights: str = "none"
    # First stage trained; None freezes the encoder (the paper's setting). Random weights must train.
    fine_tune_from: str | None = "stem"


@dataclass
class DecoderConfig:
    embed_dim: int = bounded(128, _LAYER)  # m in the paper (arctic COCO: 512)
    hidden_dim: int = bounded(256, _LAYER)  # n, LSTM size (arctic COCO: 1800)
    # f_att's hidden width (COCO configs: 512); small here: its [B, L, A] map is the largest op a step.
    attention_dim: int = bounded(64, _LAYER)
    score: Literal["additive", "dot", "scaled_dot", "bilinear"] = "additive"  # paper: additive
    # Image-side layers of the additive f_att: 1 is the paper's W a; capgen's n_layers_att=2 adds
    # tanh(W_2 . + b_2) (captioning/models/attention.py, AdditiveScore).
    attention_layers: int = bounded(1, Range(1, 8))
    gate: Literal["scalar", "vector", "none"] = "scalar"  # paper Sec. 4.2.1: scalar beta
    dropout: float = bounded(0.3, Range(0, 1, high_open=True))  # on the deep output's input (arctic: 0.5)
    # capgen's initialisation: N(0, 0.01), orthogonal square and recurrent matrices, zero biases
    # (captioning/models/decoder.py, arctic_init_).
    init: Literal["pytorch", "arctic"] = "pytorch"
    # captioning/fast.py's fused training pass and decoding form (the same maths, faster;
    # docs/performance.md); False runs the reference loop of captioning/models/decoder.py.
    fast: bool = True


@dataclass
class ModelConfig:
    # "none": the no-attention control (z_t = the mean annotation at every step, no f_att).
    attention: Literal[ATTENTIONS] = "soft"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


@dataclass
class LossConfig:
    # lambda of Eq. 14 on sum_i (1 - sum_t alpha_ti)^2 per caption, mean over the batch: the NLL's
    # scale (losses.py). The paper gives no value; the authors' code amounts to alpha_c * B / L
    # (configs/coco_*.yaml: 64 / 196 = 0.3265; docs/faithfulness.md). 0.02 (~1/L) here: with L=64
    # and ~8 words the term would outweigh the NLL and push attention onto background (docs/training.md).
    doubly_stochastic: float = bounded(0.02, Range(0, 1e6))
    # Hard attention (Sec. 4.1; capgen.py of kelvinxu/arctic-captions; docs/faithfulness.md):
    reward_scale: float = bounded(0.1, Range(0, 1e6))  # lambda_r, the hard-coded 1/10
    entropy: float = bounded(0.002, Range(0, 1e6))  # lambda_e on sum alpha log alpha
    # b <- decay * b + (1 - decay) * mean_n C_n (the cost it is subtracted from)
    baseline_decay: float = bounded(0.9, Range(0, 1, high_open=True))
    # The REINFORCE and entropy terms over captions (losses.py): "mean" like the NLL, Eq. 12's 1/N;
    # "sum" the authors' strength, B times the mean (B = captions per optimiser step, all ranks):
    # capgen's gradients on alpha carry no 1/B. docs/study.md measures both.
    hard_reduction: Literal["sum", "mean"] = "mean"
    # Location sequences sampled per caption. 1: the paper's estimator, moving-average baseline b.
    # K > 1: each draw's baseline is the mean cost of the caption's other K - 1 draws (leave-one-out,
    # unbiased, no running state; beyond the paper, docs/study.md).
    samples: int = bounded(1, Range(1, 64, why="each caption is decoded once per sample"))
    expected_context_prob: float = bounded(0.5, Range(0, 1))  # probability of using the expected context instead
    # One Bernoulli draw per minibatch (the authors' code) or per image (the paper's text).
    substitution: Literal["minibatch", "image"] = "minibatch"


@dataclass
class SyntheticConfig:
    seed: int = bounded(0, Range(0, 2**32 - 1))
    # 10,000 scenes seen 6 times beat 3,000 seen 22 times at equal compute (docs/training.md).
    num_train: int = bounded(10000, _COUNT)
    num_val: int = bounded(200, _COUNT)
    num_test: int = bounded(500, Range(0, 10**7, why="ten million"))
    image_size: int = bounded(64, Range(16, 1024, why="the scenes are drawn at this size"))
    # references per image (at most 5: a 1-object scene has 5 phrasings)
    captions_per_image: int = bounded(5, Range(1, 5, why="a one-object scene has 5 distinct true captions"))


@dataclass
class DataConfig:
    # "synthetic": generated on first use under `root`; "coco": COCO-format files under `root`;
    # "prepared": a folder of captioning prepare (its vocabulary and min_word_count, mapped images).
    dataset: Literal["synthetic", "coco", "prepared"] = "synthetic"
    root: str = "data"
    # Images are resized to image_size x image_size; a prepared folder must store this size.
    image_size: int = bounded(64, Range(1, 4096, why="images are resized to data.image_size squared"))
    # images per device; the global batch is batch_size * devices * num_nodes
    batch_size: int = bounded(32, Range(1, 65536, why="a larger batch does not fit in memory"))
    # Captions drawn (without replacement, anew each epoch) per training image, sharing one encoder
    # pass; at the synthetic sizes the encoder costs more than a caption's decoding: k=2 learns fastest.
    captions_per_image: int = bounded(2, Range(1, 100))
    eval_batch_size: int = bounded(100, Range(1, 65536, why="a larger batch does not fit in memory"))
    num_workers: int = bounded(0, Range(0, 256))
    min_word_count: int = bounded(5, Range(1, 10**9))  # vocabulary: training-split words seen at least this often
    max_caption_len: int = bounded(30, Range(1, 1000))  # tokens without <start>/<end>; longer captions are truncated
    cache_images: bool = True  # decode every image once into memory (small datasets only)
    # A folder for every split's annotation grids, computed once with a frozen encoder (fp16 .npy,
    # captioning/data/feature_cache.py). None: run the encoder every step.
    feature_cache: str | None = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class OptimConfig:
    lr: float = bounded(2e-3, Range(0, 10, low_open=True))
    encoder_lr: float = bounded(2e-3, Range(0, 10))  # for encoder stages that are fine-tuned
    weight_decay: float = bounded(0.0, Range(0, 10))
    grad_clip: float = bounded(5.0, Range(0, 1e6))  # 0 disables clipping (arctic: none)
    # False: capgen's Adam, whose bias correction is ~1 from the first step (captioning/training/optimizers.py).
    adam_bias_correction: bool = True
    # "constant" (the paper's), or "cosine": to 5% of lr over train.max_epochs (better for a short run).
    schedule: Literal["constant", "cosine"] = "cosine"


@dataclass
class DecodeConfig:
    max_len: int = bounded(30, Range(1, 1000))  # generated tokens, <end> excluded
    hard_mode: Literal[HARD_MODES] = "expected"
    # Test split, evaluate and caption; 1 = greedy. Validation is always greedy (cheap, comparable).
    beam_size: int = bounded(3, Range(1, 100))
    length_penalty: float = bounded(0.0, Range(0, 10))  # beams ranked by score / (length + 1) ** length_penalty


@dataclass
class TrainConfig:
    max_epochs: int = bounded(6, Range(1, 10**6))
    max_time_minutes: float = bounded(0.0, Range(0, 10**7))  # 0 = no limit; otherwise stop training after this long
    # What selects best.ckpt and stops early: validation BLEU-4 of greedy captions, or the references'
    # mean summed NLL under teacher forcing, as capgen's pred_probs (hard: the expected context).
    monitor: Literal["bleu_4", "nll"] = "bleu_4"
    # Validations without improvement before stopping; 10 lets a cosine run finish its tail (docs/training.md).
    patience: int = bounded(10, Range(1, 10**6))
    val_every: int = bounded(1, Range(1, 10**6))  # epochs between validations
    # Also keep epochs/epoch<N>.ckpt (the study's checks of checkpoint selection and variance use them).
    save_every_epoch: bool = False
    log_every: int = bounded(20, Range(1, 10**9))  # steps between logged training losses
    precision: str = "auto"  # "auto": bf16-mixed on GPU, 32-true on CPU
    accelerator: str = "auto"
    devices: int = bounded(1, Range(1, 1024))
    num_nodes: int = bounded(1, Range(1, 1024))
    seed: int = bounded(0, Range(0, 2**32 - 1, why="seeds are unsigned 32-bit numbers"))
    # A fraction of the batches; 0 would train (or validate) nothing and still report success.
    limit_train_batches: float = bounded(1.0, _FRACTION)
    limit_val_batches: float = bounded(1.0, _FRACTION)
    fast_dev_run: bool = False
    # torch.compile (captioning/perf/compile.py): "step" the decoder's per-step work, one graph;
    # "model" the whole forward, a graph per padded length. "reduce-overhead" adds CUDA graphs.
    compile: Literal[COMPILE_TARGETS] = "none"
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------- merging and checks


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to ``tp`` where lossless (int -> float), else raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):  # the config's unions are all ``X | None``
        if value is None:
            return None
        return _check_value(value, next(arg for arg in typing.get_args(tp) if arg is not type(None)), key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string; a float field takes it as the number it is.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"config key '{key}' expects float, got str {value!r}") from None
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config key '{key}' expects {tp.__name__}, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key '{key}' expects {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def merge(cfg: Any, updates: Mapping[str, Any], prefix: str = "") -> Any:
    """Return a copy of dataclass ``cfg`` with nested ``updates`` applied, checking every key."""
    if not isinstance(updates, Mapping):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    changes = {}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key '{full}' (known keys here: {close})")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            changes[key] = merge(current, value, prefix=f"{full}.")
        else:
            changes[key] = _check_value(value, hints[key], full)
    return dataclasses.replace(cfg, **changes)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (only str/int/float/bool/None), for YAML and checkpoints."""
    return dataclasses.asdict(cfg)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the dotted keys that --set uses."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def from_dict(data: Mapping[str, Any]) -> Config:
    return merge(Config(), data)


class _RepeatedKey(yaml.constructor.ConstructorError):
    """A key written twice in one YAML mapping (see _NoAliasLoader)."""


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases (``*name``): a config has no use for them, and a few lines of nested
    aliases (a "billion laughs") stand for a tree of billions of nodes that every later walk
    (merge, validation, saving) would visit. Refused as the parser meets the first one. A key
    written twice in one mapping is refused too: YAML would keep only the last, silently."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not accepted in a config: write the "
                                                          "value out", mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a mapping or list as a key: the constructor refuses it; "<<" merges on purpose
            key = self.construct_object(key_node)
            if key in seen:
                mark = key_node.start_mark
                raise _RepeatedKey(None, None, f"the key {key!r} is written twice (again on line {mark.line + 1}): "
                                               "write it once", mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def safe_yaml(text: str | bytes) -> Any:
    """YAML -> plain Python values, without aliases (see _NoAliasLoader); raises yaml.YAMLError."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 -- a SafeLoader subclass


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = safe_yaml(path.read_bytes()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}".splitlines()[0]) from None
    except RecursionError:
        raise ConfigError(f"config file {path} is not a config: it is nested too deeply") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def parse_override(text: str) -> dict[str, Any]:
    """``"model.decoder.dropout=0.3"`` -> ``{"model": {"decoder": {"dropout": 0.3}}}`` (YAML-typed)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value, e.g. optim.lr=0.0004")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = safe_yaml(raw) if raw.strip() else ""
    except _RepeatedKey as err:  # valid YAML syntax: quoting is not the fix
        raise ConfigError(f"override '{text[:80]}': {err.problem}") from None
    except (yaml.YAMLError, RecursionError) as err:
        reason = one_line(err, 120) if isinstance(err, yaml.YAMLError) else "nested too deeply"
        raise ConfigError(f"override '{text[:80]}': the value is not valid YAML ({reason}); quote it, "
                          "e.g. data.root='\"my path\"'") from None
    if not key or not all(key.split(".")):
        raise ConfigError(f"override '{text[:80]}' must look like key=value, e.g. optim.lr=0.0004")
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def save_yaml(cfg: Config, path: str | Path) -> None:
    atomic_write(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


#: The encoder backbones (torchvision ResNets and VGGs) and their stages, as
#: captioning/models/encoder.py cuts them; here so that a config is checked without torch.
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
VGGS = ("vgg11", "vgg13", "vgg16", "vgg19")
BACKBONES = RESNETS + VGGS
RESNET_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
VGG_STAGES = ("conv1", "conv2", "conv3", "conv4", "conv5")

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")  # Lightning's accelerator names this project runs on
PRECISIONS = ("auto", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true")


def _ranges(cls: type, prefix: str = "") -> dict[str, Range]:
    """The dotted key of every bounded field (``bounded``) under dataclass ``cls``, and its range."""
    found: dict[str, Range] = {}
    for f in dataclasses.fields(cls):
        if "range" in f.metadata:
            found[prefix + f.name] = f.metadata["range"]
        elif f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            found.update(_ranges(f.default_factory, f"{prefix}{f.name}."))
    return found


#: Every number's range, by its dotted key (as --set writes it).
RANGES: dict[str, Range] = _ranges(Config)


def _range_error(key: str, value: float, rule: Range) -> str | None:
    if value < rule.low or (rule.low_open and value == rule.low):
        if rule.low == 1 and isinstance(value, int) and not rule.low_open:
            need = "positive"
        elif rule.low == 0:
            need = "positive" if rule.low_open else ">= 0"
        else:
            need = f"above {rule.low}" if rule.low_open else f"at least {rule.low}"
    elif value > rule.high or (rule.high_open and value == rule.high):
        need = (f"below {rule.high}" if rule.high_open else f"at most {rule.high:,}") + (
            f" ({rule.why})" if rule.why else "")
    else:
        return None
    return f"config key '{key}' must be {need}, got {value}"


def validate(cfg: Config) -> Config:
    """Every value checked against its range or choices (:data:`RANGES`, the fields' types and the
    rules below), so that a bad value is one line naming the key before anything is allocated or
    written. Every way a config enters goes through it: files, --set, checkpoints, model folders."""
    flat = flatten(to_dict(cfg))
    for key, value in flat.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value}")
        if key in RANGES and (message := _range_error(key, value, RANGES[key])):
            raise ConfigError(message)
    enc = cfg.model.encoder
    stages = RESNET_STAGES if enc.backbone in RESNETS else VGG_STAGES
    for key, value, choices in (
        ("model.encoder.backbone", enc.backbone, BACKBONES),
        ("model.encoder.stage", enc.stage, (None, *stages)),
        ("train.accelerator", cfg.train.accelerator, ACCELERATORS),
        ("train.precision", cfg.train.precision, PRECISIONS),
    ):
        if value not in choices:
            names = ", ".join("null" if c is None else str(c) for c in choices)
            raise ConfigError(f"config key '{key}' is {value!r}, not one of {names}")
    kept = stages[: stages.index(enc.stage or stages[-1]) + 1]
    if enc.fine_tune_from is not None and enc.fine_tune_from not in kept:
        raise ConfigError(f"config key 'model.encoder.fine_tune_from' is {enc.fine_tune_from!r}, not one of the kept "
                          f"stages of {enc.backbone} ({', '.join(kept)}) or null (a frozen encoder)")
    for key in ("model.encoder.weights", "data.root", "data.feature_cache"):
        if flat[key] is not None and not flat[key].strip():
            raise ConfigError(f"config key '{key}' is empty; give a path" + (
                ", 'none' or 'imagenet'" if key == "model.encoder.weights" else ""))
    if cfg.model.decoder.attention_layers > 1 and cfg.model.decoder.score != "additive":
        raise ConfigError("config key 'model.decoder.attention_layers' > 1 needs model.decoder.score=additive "
                          f"(now '{cfg.model.decoder.score}')")
    if cfg.train.val_every > cfg.train.max_epochs:  # no validation at all: nothing would select best.ckpt
        raise ConfigError(f"config key 'train.val_every' ({cfg.train.val_every}) is above train.max_epochs "
                          f"({cfg.train.max_epochs}): no epoch would be validated; lower train.val_every "
                          "or raise train.max_epochs")
    if cfg.data.feature_cache is not None and cfg.model.encoder.fine_tune_from is not None:
        raise ConfigError(
            "config key 'data.feature_cache' needs a frozen encoder (cached annotations cannot be "
            f"fine-tuned): set model.encoder.fine_tune_from=null (now '{cfg.model.encoder.fine_tune_from}')"
        )
    return cfg


def _missing_sections(cfg: Any, data: Mapping, prefix: str = "") -> str | None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            if not isinstance(data.get(f.name), Mapping):
                return f"{prefix}{f.name}"
            if missing := _missing_sections(value, data[f.name], f"{prefix}{f.name}."):
                return missing
    return None


def checked(data: Any, source: str | Path, error: type[CaptioningError]) -> Config:
    """A config as a checkpoint, a model folder or an exported folder stores it (a nested mapping)
    -> the validated Config; ``error`` (the reader's, CheckpointError) names ``source`` and the key."""
    where = f"{source} holds a damaged or incompatible config"
    if not isinstance(data, Mapping):
        raise error(f"{where}: it is a {type(data).__name__}, not a mapping of settings")
    # Keys added since a file was written take their defaults; a whole section missing is damage.
    if missing := _missing_sections(Config(), data):
        raise error(f"{where}: the section '{missing}' is missing")
    try:
        return validate(from_dict(data))
    except ConfigError as err:
        raise error(f"{where}: {err}") from None


def build_config(
    config_file: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Defaults, then the YAML file's differences, then each ``key=value`` override in order."""
    cfg = Config()
    if config_file is not None:
        cfg = merge(cfg, load_yaml(config_file))
    for text in overrides:
        cfg = merge(cfg, parse_override(text))
    return validate(cfg)
