"""U-Net with torchvision's MobileNetV3-Large feature blocks as the encoder."""
from torchvision.models import MobileNet_V3_Large_Weights, mobilenet_v3_large

from .backbone import BackboneUNet, backbone_features


class MobileV3Unet(BackboneUNet):
    """``pretrain_backbone``: False, True (torchvision's ImageNet weights) or a local weight file."""

    weights_name = "mobilenet_v3_large"
    # The last block at each resolution, 1/2 to 1/32; the output is resized back to the input.
    stage_indices = (1, 3, 6, 12, 15)

    def __init__(self, num_classes: int, pretrain_backbone=False):
        # V1 is the file the tutorial downloads (mobilenet_v3_large-8738ca79.pth).
        features = backbone_features(mobilenet_v3_large, MobileNet_V3_Large_Weights.IMAGENET1K_V1, pretrain_backbone)
        stage_out_channels = [features[i].out_channels for i in self.stage_indices]
        super().__init__(features, self.stage_indices, stage_out_channels, num_classes, pretrain_backbone)
