"""The segmentation models and their registry: one entry per model, and the factory every script builds them with.

The package depends on torch and torchvision only: a bad setting or a weight
file that does not fit raises ``ValueError``, which the scripts report.
Importing it loads neither: the scripts' parsers read ``MODEL_NAMES`` before
torch loads (``--help`` answers at once), so each model module is imported
when a model is first built or named (``from src import UNet`` still works).

Adding a model: write its module (``forward`` returns ``{"out": logits}``),
then add one ``ModelSpec`` to ``MODELS``. Everything else (the ``--model``
choices, tiling, export sizes, what the scripts print) reads the entry.
"""
import importlib
from typing import Callable, NamedTuple


class ModelSpec(NamedTuple):
    """What the scripts need to know about a model, beside building it."""
    builder: Callable  # (num_classes, base_c, pretrain_backbone) -> nn.Module
    size_multiple: int  # input sizes its poolings divide evenly (tiles are rounded to it); the least image side
    min_size: int  # smallest height and width the export accepts (the deepest feature map >= 2 px)
    uses_base_c: bool  # whether --base-c sets its width
    backbone: bool  # whether --pretrained-backbone can start its encoder from ImageNet weights


def _unet(num_classes, base_c, pretrain_backbone):
    if pretrain_backbone:
        from .backbone import PRETRAIN_ONLY_BACKBONES
        raise ValueError(PRETRAIN_ONLY_BACKBONES)
    from .unet import UNet
    return UNet(in_channels=3, num_classes=num_classes, bilinear=True, base_c=base_c)


def _vgg16_unet(num_classes, base_c, pretrain_backbone):
    from .vgg_unet import VGG16UNet
    return VGG16UNet(num_classes, pretrain_backbone)


def _mobilenet_v3_unet(num_classes, base_c, pretrain_backbone):
    from .mobilenet_unet import MobileV3Unet
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


# The names served from their modules on first use (PEP 562), which import torch.
_LAZY = {
    "UNet": "unet",
    "VGG16UNet": "vgg_unet",
    "MobileV3Unet": "mobilenet_unet",
    "load_backbone_weights": "backbone",
    "IMAGENET_MEAN": "backbone",
    "IMAGENET_STD": "backbone",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "UNet", "VGG16UNet", "MobileV3Unet", "MODELS", "MODEL_NAMES", "ModelSpec", "model_spec", "build_model",
    "describe", "load_backbone_weights", "IMAGENET_MEAN", "IMAGENET_STD",
]
