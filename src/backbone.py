"""The shared encoder-decoder of the backbone U-Nets and loading their ImageNet encoder weights."""
import os
from typing import Dict, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.feature_extraction import create_feature_extractor

from .unet import OutConv, Up, _graph_capture

# The normalisation the torchvision ImageNet weights were trained with; use it
# instead of the DRIVE statistics when the encoder starts from those weights.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRETRAIN_ONLY_BACKBONES = "--pretrained-backbone applies to vgg16_unet and mobilenet_v3_unet"


class BackboneUNet(nn.Module):
    """U-Net decoder on the stages of a torchvision ``features`` Sequential.

    ``stage_indices`` name the blocks of ``features`` whose outputs are the
    skips, shallowest first; blocks after the last one are dropped. A path in
    ``pretrain_backbone`` is a local ImageNet weight file for the encoder.
    """

    in_channels = 3
    weights_name = ""  # torchvision's name for the classifier, for messages

    def __init__(self, features: nn.Sequential, stage_indices: Sequence[int], stage_out_channels: Sequence[int],
                 num_classes: int, pretrain_backbone=False):
        super().__init__()
        self.num_classes = num_classes
        self.stage_indices = tuple(stage_indices)
        self.backbone = create_feature_extractor(features, {str(j): f"stage{i}" for i, j in enumerate(stage_indices)})
        self.stage_out_channels = c = list(stage_out_channels)
        self.up1 = Up(c[4] + c[3], c[3])
        self.up2 = Up(c[3] + c[2], c[2])
        self.up3 = Up(c[2] + c[1], c[1])
        self.up4 = Up(c[1] + c[0], c[0])
        self.conv = OutConv(c[0], num_classes)
        if _is_path(pretrain_backbone):
            load_backbone_weights(self, pretrain_backbone)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        input_hw = x.shape[-2:]
        s = list(self.backbone(x).values())
        x = self.up1(s[4], s[3])
        x = self.up2(x, s[2])
        x = self.up3(x, s[1])
        x = self.up4(x, s[0])
        x = self.conv(x)
        # The shallowest stage may sit below the input resolution (MobileNet's is H/2). When the model is
        # exported, always resize (to the same size it changes nothing): a size test would be frozen.
        if _graph_capture() or x.shape[-2:] != input_hw:
            x = F.interpolate(x, size=input_hw, mode="bilinear", align_corners=False)
        return {"out": x}


def _is_path(x) -> bool:
    return isinstance(x, (str, os.PathLike))


def _encoder_state(state: dict, last_index: int) -> Tuple[str, Dict[str, object]]:
    """The key prefix and the encoder entries of a classifier (``features.*``) or encoder-only state dict.

    The classifier head and the ``features`` blocks after the last stage (e.g.
    MobileNet's final 960-channel conv) are not part of the encoder: dropped.
    """
    prefix = "features." if any(str(k).startswith("features.") for k in state) else ""
    state = {str(k)[len(prefix):]: v for k, v in state.items() if str(k).startswith(prefix)}
    first = lambda k: k.split(".", 1)[0]  # noqa: E731
    return prefix, {k: v for k, v in state.items() if not (first(k).isdigit() and int(first(k)) > last_index)}


def load_backbone_weights(model: nn.Module, weights, source=None) -> None:
    """Load ImageNet encoder weights into ``model``'s encoder.

    ``weights`` is a state dict, or the path of a local torchvision weight file
    (read with ``weights_only=True``: tensors only, never code): the
    classifier's state dict as torchvision saves it (e.g.
    ``vgg16_bn-6c64b313.pth``) or a state dict of its ``features`` alone.
    Weights that do not fit raise ``ValueError`` naming ``source`` (the file)
    and the first key that does not fit; the model is then unchanged.
    """
    model = getattr(model, "module", model)  # accept a DDP-wrapped model
    if not isinstance(model, BackboneUNet):
        raise ValueError(PRETRAIN_ONLY_BACKBONES)
    if _is_path(weights):
        source = source or os.fspath(weights)
        weights = torch.load(weights, map_location="cpu", weights_only=True)
    what = f"{source or 'the state dict'} does not fit the {model.weights_name} encoder"
    state = weights
    if not isinstance(state, dict):
        raise ValueError(f"{what}: expected a state dict, found {type(state).__name__}")

    prefix, state = _encoder_state(state, max(model.stage_indices))
    own = model.backbone.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing:
        raise ValueError(f"{what}: missing key {prefix + missing[0]!r}")
    if unexpected:
        raise ValueError(f"{what}: unexpected key {prefix + unexpected[0]!r}")
    for k, v in state.items():
        if not isinstance(v, torch.Tensor) or v.shape != own[k].shape:
            found = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{what}: key {prefix + k!r} is {found}, expected {tuple(own[k].shape)}")
    # Old torchvision files predate BN's num_batches_tracked: keep the model's own.
    own.update(state)
    model.backbone.load_state_dict(own)


def backbone_features(builder, weights, pretrain_backbone) -> nn.Sequential:
    """``builder(weights=...).features``, with the ImageNet ``weights`` when ``pretrain_backbone`` is true.

    torchvision downloads them once into the torch hub cache. A path in
    ``pretrain_backbone`` is not handled here: ``BackboneUNet`` loads it once
    the model exists.
    """
    weights = weights if pretrain_backbone and not _is_path(pretrain_backbone) else None
    try:
        return builder(weights=weights).features
    except OSError as e:  # urllib's URLError is an OSError: no network and nothing in the torch hub cache
        if weights is None:
            raise
        raise OSError(f"cannot download {weights.url} ({e}); fetch it elsewhere and give its local path instead") from None
