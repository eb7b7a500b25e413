"""Shapes, gradients, the factory and ImageNet weight loading for the three U-Nets."""
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torchvision

from src import MODEL_NAMES, MobileV3Unet, UNet, VGG16UNet, build_model
import src
from train import load_backbone_file as load_backbone_weights  # the file, read as --pretrained-backbone reads it
from tests.conftest import ROOT
from train_utils.errors import UserError

SIZES = [(64, 64), (65, 77), (97, 50)]
MODELS = {
    "unet_bilinear": lambda: UNet(in_channels=3, num_classes=2, bilinear=True, base_c=8),
    "unet_transposed": lambda: UNet(in_channels=3, num_classes=2, bilinear=False, base_c=8),
    "vgg16_unet": lambda: VGG16UNet(num_classes=2),
    "mobilenet_v3_unet": lambda: MobileV3Unet(num_classes=2),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    torch.manual_seed(0)
    return MODELS[request.param]()


@pytest.mark.parametrize("hw", SIZES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_output_matches_input_size(model, hw):
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *hw))
    assert list(out) == ["out"]
    assert out["out"].shape == (1, 2, *hw)


def test_every_parameter_gets_a_gradient(model):
    # Train mode and batch 2: BN needs more than one value per channel at MobileNet's 3x3 deepest stage.
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(torch.randn(2, 3, 65, 77))["out"]
    (out * torch.randn_like(out)).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_build_model_by_name():
    assert MODEL_NAMES == ("unet", "vgg16_unet", "mobilenet_v3_unet")
    unet = build_model("unet", num_classes=3, base_c=8)
    assert isinstance(unet, UNet) and unet.num_classes == 3 and unet.bilinear and unet.in_conv[0].out_channels == 8
    assert isinstance(build_model("vgg16_unet", num_classes=2), VGG16UNet)
    mobile = build_model("mobilenet_v3_unet", num_classes=4, base_c=8)  # base_c does not apply
    assert isinstance(mobile, MobileV3Unet) and mobile.conv[0].out_channels == 4
    assert [m for m, spec in src.MODELS.items() if spec.uses_base_c] == ["unet"]
    assert {m: spec.size_multiple for m, spec in src.MODELS.items()} == {"unet": 16, "vgg16_unet": 32,
                                                                      "mobilenet_v3_unet": 32}
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet_unet")
    with pytest.raises(ValueError, match="applies to vgg16_unet and mobilenet_v3_unet"):
        build_model("unet", pretrain_backbone=True)


def test_models_stand_alone():
    """``src`` depends on torch and torchvision only: importing it loads none of the project's other code."""
    code = ("import sys, src; m = src.build_model('unet', base_c=4); "
            "print(sorted(n for n in sys.modules if n.split('.')[0] in ('train_utils', 'my_dataset', 'train')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def _save_classifier(clf: nn.Module, path) -> dict:
    """Save ``clf``'s state dict with every tensor randomised, so a load is visible against a fresh model."""
    torch.manual_seed(1)
    state = clf.state_dict()
    for k, v in state.items():
        v.copy_(torch.rand_like(v) + 0.5 if v.is_floating_point() else torch.full_like(v, 7))
    torch.save(state, path)
    return state


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    clf = torchvision.models.vgg16_bn(weights=None)
    # torchvision's keys (classifier.0/3/6); the 124M-parameter head, which the
    # loader ignores, is shrunk to keep the file small.
    for i in (0, 3, 6):
        clf.classifier[i] = nn.Linear(4, 4)
    path = tmp_path_factory.mktemp("weights") / "vgg16_bn-test.pth"
    return path, _save_classifier(clf, path)


@pytest.fixture(scope="module")
def mobilenet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v3_large-test.pth"
    return path, _save_classifier(torchvision.models.mobilenet_v3_large(weights=None), path)


def _assert_encoder_equals(model, state, prefix="features."):
    own = model.backbone.state_dict()
    assert own  # guards against comparing nothing
    for k, v in own.items():
        assert torch.equal(v, state[prefix + k]), k


def test_load_vgg16_bn_classifier_file(vgg_file):
    path, state = vgg_file
    model = VGG16UNet(num_classes=2)
    decoder_before = model.up4.conv[0].weight.clone()
    load_backbone_weights(model, path)
    _assert_encoder_equals(model, state)
    assert torch.equal(model.up4.conv[0].weight, decoder_before)


def test_load_mobilenet_file_by_path_argument(mobilenet_file):
    path, state = mobilenet_file
    # The file's features.16 (the 960-channel conv after the last stage) and classifier are ignored.
    _assert_encoder_equals(MobileV3Unet(num_classes=2, pretrain_backbone=path), state)
    _assert_encoder_equals(build_model("mobilenet_v3_unet", pretrain_backbone=str(path)), state)


def test_load_encoder_only_state_dict(mobilenet_file, tmp_path):
    _, state = mobilenet_file
    features_only = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    torch.save(features_only, tmp_path / "features.pth")
    model = MobileV3Unet(num_classes=2)
    load_backbone_weights(model, tmp_path / "features.pth")
    _assert_encoder_equals(model, state)


def test_mismatching_files_are_refused(vgg_file, mobilenet_file, tmp_path):
    model = MobileV3Unet(num_classes=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    resnet = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), resnet)
    with pytest.raises(UserError, match=f"{re.escape(str(resnet))}.*mobilenet_v3_large.*'0.0.weight'"):
        load_backbone_weights(model, resnet)

    vgg_path, _ = vgg_file
    with pytest.raises(UserError, match=f"{re.escape(str(vgg_path))}.*missing key 'features.0.0.weight'"):
        load_backbone_weights(model, vgg_path)

    _, state = mobilenet_file
    bad_shape = dict(state, **{"features.2.block.0.0.weight": torch.zeros(8, 16, 1, 1)})
    torch.save(bad_shape, tmp_path / "bad_shape.pth")
    with pytest.raises(UserError, match=r"'features.2.block.0.0.weight' is \(8, 16, 1, 1\), expected \(64, 16, 1, 1\)"):
        load_backbone_weights(model, tmp_path / "bad_shape.pth")

    with pytest.raises(UserError, match="not found"):
        load_backbone_weights(model, tmp_path / "absent.pth")
    # A refused file changes nothing.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_vgg_model_refuses_mobilenet_file(mobilenet_file):
    path, _ = mobilenet_file
    with pytest.raises(UserError, match=f"{re.escape(str(path))}.*vgg16_bn.*missing key 'features.0.weight'"):
        load_backbone_weights(VGG16UNet(num_classes=2), path)


def test_plain_unet_refuses_backbone_weights(mobilenet_file):
    with pytest.raises(UserError, match="applies to vgg16_unet and mobilenet_v3_unet"):
        load_backbone_weights(UNet(3, 2, base_c=8), mobilenet_file[0])


class _RunsCode:
    """Pickles as a call to os.system: loading it without weights_only runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_file_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"features.0.0.weight": _RunsCode(marker)}, path)
    with pytest.raises(UserError, match="refusing to load .*evil.pth"):
        load_backbone_weights(MobileV3Unet(num_classes=2), path)
    assert not marker.exists()
    # Control: the payload is live, so the refusal above is what kept it from running.
    torch.load(path, weights_only=False)
    assert marker.exists()
