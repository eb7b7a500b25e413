"""The segmentation models and their registry: one entry per model, and the factory every script builds them with.

The package depends on torch and torchvision only: a bad setting or a weight
file that does not fit raises ``ValueError``, which the scripts report.

Adding a model: write its module (``forward`` returns ``{"out": logits}``),
then add one ``ModelSpec`` to ``MODELS``. Everything else (the ``--model``
choices, tiling, export sizes, what the scripts print) reads the entry.
"""
from typing import Callable, NamedTuple

from .backbone import IMAGENET_MEAN, IMAGENET_STD, PRETRAIN_ONLY_BACKBONES, load_backbone_weights
from .mobilenet_unet import MobileV3Unet
from .unet import UNet
from .vgg_unet import VGG16UNet


class ModelSpec(NamedTuple):
    """What the scripts need to know about a model, beside building it."""
    builder: Callable  # (num_classes, base_c, pretrain_backbone) -> nn.Module
    size_multiple: int  # input sizes its poolings divide evenly (tiles are rounded to it)
    min_size: int  # smallest height and width the export accepts (the deepest feature map >= 2 px)
    uses_base_c: bool  # whether --base-c sets its width
    backbone: bool  # whether --pretrained-backbone can start its encoder from ImageNet weights


def _unet(num_classes, base_c, pretrain_backbone):
    if pretrain_backbone:
        raise ValueError(PRETRAIN_ONLY_BACKBONES)
    return UNet(in_channels=3, num_classes=num_classes, bilinear=True, base_c=base_c)


def _vgg16_unet(num_classes, base_c, pretrain_backbone):
    return VGG16UNet(num_classes, pretrain_backbone)


def _mobilenet_v3_unet(num_classes, base_c, pretrain_backbone):
    return MobileV3Unet(num_classes, pretrain_backbone)


# The U-Net pools 4 times (sizes divide by 16); the backbones' encoders 5 times (32).
MODELS = {
    "unet": ModelSpec(_unet, size_multiple=16, min_size=32, uses_base_c=True, backbone=False),
    "vgg16_unet": ModelSpec(_vgg16_unet, size_multiple=32, min_size=64, uses_base_c=False, backbone=True),
    "mobilenet_v3_unet": ModelSpec(_mobilenet_v3_unet, size_multiple=32, min_size=64, uses_base_c=False,
                                   backbone=True),
}
MODEL_NAMES = tuple(MODELS)


def model_spec(model):
    """The registry entry of ``model``; ``ValueError`` naming the choices for an unknown name."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODEL_NAMES)}")
    return MODELS[model]


def build_model(model="unet", num_classes=2, base_c=32, pretrain_backbone=False):
    """Build a model by name.

    ``num_classes`` counts the background too. Keyword names match the keys of
    a checkpoint's ``args`` dict, so ``build_model(**model_args)`` rebuilds
    what was trained. Models whose entry says ``uses_base_c=False`` ignore
    ``base_c``; a backbone model's ``pretrain_backbone`` is False, True
    (torchvision's ImageNet download) or the path of a local torchvision weight file.
    """
    return model_spec(model).builder(num_classes, base_c, pretrain_backbone)


def describe(model, num_classes, base_c):
    """``unet (2 classes incl. background, base_c 32)``: how the scripts name a model they load."""
    width = f", base_c {base_c}" if model_spec(model).uses_base_c else ""
    return f"{model} ({num_classes} classes incl. background{width})"


__all__ = [
    "UNet", "VGG16UNet", "MobileV3Unet", "MODELS", "MODEL_NAMES", "ModelSpec", "model_spec", "build_model",
    "describe", "load_backbone_weights", "IMAGENET_MEAN", "IMAGENET_STD",
]
