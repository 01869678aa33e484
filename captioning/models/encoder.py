"""The CNN encoder: an image becomes a grid of L annotation vectors a_i in R^D (paper Sec. 3.1.1).

The paper takes VGG-19's conv5_4 feature map before the last max-pool (14x14x512 for a 224x224
image). Popular ports use ResNet-101's last stage pooled to 14x14 (196x2048). Both are here: any
torchvision ResNet or VGG, cut after a named stage, adaptively pooled to ``grid_size``.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from captioning.console import CaptioningError, InvalidValue
from captioning.config import BACKBONES, RESNETS, VGG_STAGES, EncoderConfig

if TYPE_CHECKING:
    import torchvision


class EncoderWeightsError(CaptioningError, RuntimeError):
    """Pretrained weights could not be loaded (offline, missing or mismatched file)."""


def backbone_stages(net: torchvision.models.ResNet | torchvision.models.VGG,
                    backbone: str) -> list[tuple[str, nn.Module]]:
    """The named stages of the torchvision ``backbone`` ``net``, in order. A VGG's ``features`` are
    split at its max-pools: conv_k is the k-th block; conv1..conv4 end with their pool (so the next
    block sees the downsampled map), conv5 stops BEFORE its pool: the paper's annotations are
    conv5_4 (VGG-19) before max-pooling, at stride 16."""
    if backbone in RESNETS:
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        return [("stem", stem), ("layer1", net.layer1), ("layer2", net.layer2),
                ("layer3", net.layer3), ("layer4", net.layer4)]
    stages, current = [], []
    for layer in net.features:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            stages.append(current)
            current = []
    stages[-1] = stages[-1][:-1]  # drop the final max-pool
    return [(name, nn.Sequential(*layers)) for name, layers in zip(VGG_STAGES, stages)]


def _stage_channels(stages: list[tuple[str, nn.Module]]) -> int:
    for _, module in reversed(stages):
        convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
        if convs:
            return convs[-1].out_channels
    raise InvalidValue("encoder has no convolution")


def load_backbone_weights(net: nn.Module, backbone: str, weights: str) -> None:
    """Load ``weights`` ("none", "imagenet" or a state-dict path) into the torchvision ``net``."""
    if weights == "none":
        return
    if weights == "imagenet":
        import torchvision

        enum = torchvision.models.get_model_weights(backbone).DEFAULT
        try:
            state = enum.get_state_dict(progress=True, check_hash=True)
        except Exception as err:  # URLError, OSError, hash mismatch: all mean "no usable file"
            raise EncoderWeightsError(
                f"could not get ImageNet weights for {backbone} ({type(err).__name__}: {err}); "
                f"offline, download {enum.url} elsewhere and set model.encoder.weights=/path/to/"
                f"{Path(enum.url).name}, or put it in {torch.hub.get_dir()}/checkpoints/"
            ) from None
    else:
        path = Path(weights)
        if not path.is_file():
            raise EncoderWeightsError(
                f"encoder weights file {path} does not exist; set model.encoder.weights to a "
                "torchvision state-dict file, 'imagenet' or 'none'"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise EncoderWeightsError(f"encoder weights file {path} is not a readable state dict: {err}") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    # The classifier head is discarded later; only the convolutional part must match.
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except (RuntimeError, TypeError) as err:  # wrong shapes, or not a dict of tensors at all
        first = str(err).strip().splitlines()[0]
        raise EncoderWeightsError(f"weights {weights} do not fit {backbone}: {first}") from None
    missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
    if missing or unexpected:
        raise EncoderWeightsError(
            f"weights {weights} do not fit {backbone}: {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )


class Encoder(nn.Module):
    """Image -> annotation grid.

    forward(images [B, 3, H, W], image_mask [B, H, W] bool or None)
        -> features [B, L, D], feature_mask [B, L] bool (True = a real location)
    with L = grid_size**2. The mask lets images of different aspect ratios be padded into one
    batch: a grid cell that covers mostly padding gets mask False and zero attention.
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        if cfg.backbone not in BACKBONES:
            raise InvalidValue(f"unknown encoder backbone '{cfg.backbone}'; choose one of {', '.join(BACKBONES)}")
        import torchvision  # here, where a backbone is built: importing the model needs none

        net = torchvision.models.get_model(cfg.backbone, weights=None)
        load_backbone_weights(net, cfg.backbone, cfg.weights)
        all_stages = backbone_stages(net, cfg.backbone)
        names = [name for name, _ in all_stages]
        last = cfg.stage or names[-1]
        if last not in names:
            raise InvalidValue(f"model.encoder.stage '{last}' is not a stage of {cfg.backbone} ({', '.join(names)})")
        kept = all_stages[: names.index(last) + 1]
        # Channels-last: oneDNN's convolutions on CPU and tensor cores on GPU are faster in NHWC.
        self.stages = nn.Sequential(OrderedDict(kept)).to(memory_format=torch.channels_last)
        self.out_channels = _stage_channels(kept)
        self.grid_size = cfg.grid_size
        self.pool = nn.AdaptiveAvgPool2d(cfg.grid_size)
        self.backbone, self.stage = cfg.backbone, last
        self._warned: set[tuple[int, int]] = set()  # map sizes already warned about (_check_grid)

        kept_names = [name for name, _ in kept]
        if cfg.fine_tune_from is None:
            self.trainable_from = len(kept_names)
        elif cfg.fine_tune_from in kept_names:
            self.trainable_from = kept_names.index(cfg.fine_tune_from)
        else:
            raise InvalidValue(
                f"model.encoder.fine_tune_from '{cfg.fine_tune_from}' is not a kept stage "
                f"({', '.join(kept_names)}) nor null (frozen)"
            )
        for i, stage in enumerate(self.stages):
            stage.requires_grad_(i >= self.trainable_from)

    def _check_grid(self, fmap_size: torch.Size, image_size: torch.Size) -> None:
        """Warn (once per map size) when the grid is finer than the stage's map: adaptive pooling then
        repeats cells, and several of the L locations hold the same annotation (e.g. ResNet layer4
        at 224 px is 7x7; a 14x14 grid has 49 distinct of 196 locations)."""
        h, w = int(fmap_size[0]), int(fmap_size[1])
        g = self.grid_size
        if (h >= g and w >= g) or (h, w) in self._warned:
            return
        self._warned.add((h, w))
        H, W = int(image_size[0]), int(image_size[1])
        scale = -(-g // min(h, w))  # the image must grow this many times for a native grid
        warnings.warn(
            f"encoder: {self.backbone} up to {self.stage} gives a {h}x{w} map for {H}x{W} images, so pooling it to "
            f"the {g}x{g} grid (model.encoder.grid_size) repeats cells: at most {h * w} distinct of {g * g} "
            f"locations. Use images of at least {H * scale}x{W * scale} (data.image_size), "
            f"model.encoder.grid_size <= {min(h, w)}, or an earlier model.encoder.stage",
            stacklevel=2)

    @property
    def frozen_stages(self) -> list[nn.Module]:
        return list(self.stages)[: self.trainable_from]

    def train(self, mode: bool = True) -> "Encoder":
        # Frozen stages keep batch-norm in eval mode: their running statistics are part of the
        # pretrained weights and must not drift with our batches.
        super().train(mode)
        for stage in self.frozen_stages:
            stage.eval()
        return self

    def forward(
        self, images: torch.Tensor, image_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.stages(images.contiguous(memory_format=torch.channels_last))  # (B, D, h, w)
        if not torch.compiler.is_compiling():
            self._check_grid(fmap.shape[-2:], images.shape[-2:])
        fmap = self.pool(fmap)  # (B, D, g, g)
        features = fmap.flatten(2).transpose(1, 2)  # (B, L, D)
        B, L = features.shape[:2]
        if image_mask is None:
            mask = torch.ones(B, L, dtype=torch.bool, device=features.device)
        else:
            cover = F.adaptive_avg_pool2d(image_mask[:, None].float(), self.grid_size)  # (B, 1, g, g)
            mask = cover.flatten(1) >= 0.5  # (B, L)
            # An image is never left with no location to attend to.
            mask[mask.sum(1) == 0] = True
        return features, mask
