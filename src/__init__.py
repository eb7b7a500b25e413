"""The segmentation models and the one factory every script builds them with.

The package depends on torch and torchvision only: a bad setting or a weight
file that does not fit raises ``ValueError``, which the scripts report.
"""
from .backbone import IMAGENET_MEAN, IMAGENET_STD, PRETRAIN_ONLY_BACKBONES, load_backbone_weights
from .mobilenet_unet import MobileV3Unet
from .unet import UNet
from .vgg_unet import VGG16UNet

MODEL_NAMES = ("unet", "vgg16_unet", "mobilenet_v3_unet")


def build_model(model="unet", num_classes=2, in_channels=3, base_c=32, bilinear=True, pretrain_backbone=False):
    """Build a model by name.

    ``num_classes`` counts the background too. Keyword names match the keys of
    a checkpoint's ``args`` dict, so ``build_model(**model_args)`` rebuilds
    what was trained. The backbone models ignore ``base_c`` and ``bilinear``;
    their ``pretrain_backbone`` is False, True (torchvision's ImageNet
    download) or the path of a local torchvision weight file.
    """
    if model == "unet":
        if pretrain_backbone:
            raise ValueError(PRETRAIN_ONLY_BACKBONES)
        return UNet(in_channels=in_channels, num_classes=num_classes, bilinear=bilinear, base_c=base_c)
    backbones = {"vgg16_unet": VGG16UNet, "mobilenet_v3_unet": MobileV3Unet}
    if model in backbones:
        if in_channels != 3:
            raise ValueError(f"{model} takes RGB input (in_channels=3), got in_channels={in_channels}")
        return backbones[model](num_classes=num_classes, pretrain_backbone=pretrain_backbone)
    raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODEL_NAMES)}")


__all__ = [
    "UNet", "VGG16UNet", "MobileV3Unet", "MODEL_NAMES", "build_model",
    "load_backbone_weights", "IMAGENET_MEAN", "IMAGENET_STD",
]
