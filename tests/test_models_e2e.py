"""Each model trains, checkpoints and predicts through the scripts; --pretrained-backbone loads a local file."""
import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import predict
import train
from tests.conftest import TINY_TRAIN
from train_utils.errors import UserError

# The backbone models pool 5 times: 64-pixel crops keep a 2 x 2 deepest map.
# (argparse keeps the last value of a repeated flag)
FLAGS = [*TINY_TRAIN, "--crop-size", "64"]


def parse(*argv):
    return train.parse_args(train.get_args_parser(), [str(a) for a in argv])


@pytest.mark.parametrize("model", ["unet", "vgg16_unet", "mobilenet_v3_unet"])
def test_train_then_predict_each_model(drive_root, tmp_path, model):
    out = tmp_path / "run"
    train.main(parse("--data-path", drive_root, "--output-dir", out, "--epochs", 1, "--model", model, *FLAGS))
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["args"]["model"] == model
    img = os.path.join(drive_root, "DRIVE", "test", "images", "01_test.tif")
    dest = tmp_path / "pred.png"
    predict.main(predict.get_args_parser().parse_args(
        ["--weights", str(out / "checkpoint.pth"), "--img", img, "--output", str(dest), "--device", "cpu"]))
    mask = np.array(Image.open(dest))
    assert mask.shape == (64, 60) and set(np.unique(mask)) <= {0, 255}


def test_pretrained_backbone_from_local_file(drive_root, tmp_path, capsys):
    # A torchvision classifier's state dict, as torchvision saves ImageNet weights (random values here).
    torch.manual_seed(0)
    weights = tmp_path / "mobilenet_v3_large.pth"
    classifier = torchvision.models.mobilenet_v3_large(weights=None)
    torch.save(classifier.state_dict(), weights)
    out = tmp_path / "run"
    args = parse("--data-path", drive_root, "--output-dir", out, "--epochs", 1, "--model", "mobilenet_v3_unet",
                 "--pretrained-backbone", weights, "--lr", "0", *FLAGS)
    train.main(args)
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["args"]["mean"] == pytest.approx([0.485, 0.456, 0.406])  # ImageNet's when none is given
    # With lr 0 the encoder's convolution weights are exactly the file's.
    assert torch.equal(ckpt["model"]["backbone.0.0.weight"], classifier.state_dict()["features.0.0.weight"])
    wrong = tmp_path / "vgg.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(UserError, match="vgg.pth"):
        train.main(parse("--data-path", drive_root, "--output-dir", out, "--epochs", 1,
                         "--model", "mobilenet_v3_unet", "--pretrained-backbone", wrong, *FLAGS))
    with pytest.raises(UserError, match="applies to vgg16_unet and mobilenet_v3_unet"):
        train.main(parse("--data-path", drive_root, "--output-dir", out, "--epochs", 1,
                         "--pretrained-backbone", weights, *FLAGS))
