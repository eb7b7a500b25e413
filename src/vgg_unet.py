"""U-Net with torchvision's VGG16-BN convolutional layers as the encoder."""
from torchvision.models import VGG16_BN_Weights, vgg16_bn

from .backbone import BackboneUNet, backbone_features


class VGG16UNet(BackboneUNet):
    """``pretrain_backbone``: False, True (torchvision's ImageNet weights) or a local weight file."""

    weights_name = "vgg16_bn"
    # The ReLUs before each max-pool: full, 1/2, 1/4, 1/8 and 1/16 resolution.
    stage_indices = (5, 12, 22, 32, 42)
    stage_out_channels = (64, 128, 256, 512, 512)

    def __init__(self, num_classes: int, pretrain_backbone=False):
        features = backbone_features(vgg16_bn, VGG16_BN_Weights.IMAGENET1K_V1, pretrain_backbone)
        super().__init__(features, self.stage_indices, self.stage_out_channels, num_classes, pretrain_backbone)
