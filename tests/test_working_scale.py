"""The working scale of a photograph (--fov-diameter, --fov-diameter-max): the scale chosen from its field of
view, the way back to its own size, and a vessel of known width keeping that width in the mask predict.py
writes, whatever the photograph's resolution; the training side (each photograph at its working scale,
the random resize around it)."""
import argparse
import math

import numpy as np
import pytest
import torch
from PIL import Image

from train_utils import prediction
from my_dataset import Sample, VesselDataset
from train_utils.imaging import fov_diameter, fov_scale, working_diameter
from train_utils.transforms import draw_short_side

# A model trained at a FOV of 700 px that keeps high-resolution photographs at their own scale up to 1024 px.
LOW, HIGH = 700, 1024


@pytest.mark.parametrize("native,diameter,diameter_max,expected", [
    (540, LOW, HIGH, LOW),      # DRIVE-sized: enlarged to the smallest working scale
    (700, LOW, HIGH, 700),
    (950, LOW, HIGH, 950),      # CHASE_DB1-sized: kept as it is
    (3300, LOW, HIGH, HIGH),    # HRF-sized: reduced no further than the largest
    (3300, LOW, 0, LOW),        # without a maximum, every photograph at --fov-diameter (the shipped rule before)
    (540, LOW, LOW, LOW), (3300, LOW, LOW, LOW),
    (3300, 0, HIGH, 3300),      # no --fov-diameter: each at its own size
])
def test_working_diameter(native, diameter, diameter_max, expected):
    assert working_diameter(native, diameter, diameter_max) == expected


def disc(size, diameter):
    """A square image's centred circular FOV of ``diameter`` pixels, cut by the image if larger."""
    yy, xx = np.mgrid[:size, :size] + 0.5
    return (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (diameter / 2) ** 2


@pytest.mark.parametrize("size,diameter", [(400, 380), (1000, 950), (2600, 2900)])
def test_fov_scale_is_chosen_from_the_photographs_fov(size, diameter):
    inside = disc(size, diameter)
    measured = fov_diameter(inside)
    assert measured == pytest.approx(diameter, abs=2)
    expected = min(max(measured, LOW), HIGH) / measured
    assert fov_scale(inside, LOW, HIGH) == pytest.approx(expected)
    assert fov_scale(inside, LOW) == pytest.approx(LOW / measured)
    assert fov_scale(inside, 0, HIGH) == 1.0


class DarkerIsVessel(torch.nn.Module):
    """A stand-in for a trained network with a known answer: vessel where the green channel (the input in
    0..1, no normalisation) is darker than ``level``, with soft logits so that the probabilities resized back
    to the photograph's size carry the edge between pixels."""

    def __init__(self, level, sharpness=20.0):
        super().__init__()
        # a parameter, as a network has: predict finds the device from it
        self.level = torch.nn.Parameter(torch.tensor(float(level)), requires_grad=False)
        self.sharpness = sharpness

    def forward(self, x):
        margin = (self.level - x[:, 1:2]) * self.sharpness
        return {"out": torch.cat([-margin, margin], dim=1)}


def vessel_photo(folder, diameter, width):
    """A square photograph whose circular FOV is ``diameter`` pixels across, with a vertical vessel ``width``
    pixels wide through its centre; its FOV mask beside it. Returns (photo path, mask path, first column)."""
    size = int(diameter * 1.05)
    inside = disc(size, diameter)
    image = np.zeros((size, size, 3), np.uint8)
    image[inside] = (200, 160, 80)
    left = (size - width) // 2
    image[:, left:left + width][inside[:, left:left + width]] = (150, 60, 30)
    photo, mask = folder / f"photo_{diameter}.png", folder / f"photo_{diameter}_mask.png"
    Image.fromarray(image).save(photo)
    Image.fromarray(inside.astype(np.uint8) * 255).save(mask)
    return photo, mask, left


def settings(tmp_path):
    return argparse.Namespace(tile_size=1024, tile_overlap=128, batch_size=1, tta=False, channels_last=False,
                              save_prob=False, overlay=False, measure=False, threshold=None)


# (FOV diameter, vessel width): enlarged (500 -> 700), kept (900), reduced (1600 and 3000 -> 1024, 0.64 and 0.34x).
# A 4 px vessel of a 3000 px FOV is 1.4 px wide at 1024 px: two working pixels of moderate darkness, which
# resized probabilities would draw 6 px wide and resized log-probabilities draw 4 px wide.
@pytest.mark.parametrize("diameter,width", [(500, 3), (900, 4), (1600, 5), (3000, 9), (3000, 4)])
def test_a_vessel_keeps_its_width_in_the_written_mask(tmp_path, diameter, width):
    photo_path, mask_path, left = vessel_photo(tmp_path, diameter, width)
    net = prediction.Network(DarkerIsVessel(level=(60 + 160) / 2 / 255), {}, {"model": "unet"}, torch.device("cpu"),
                          [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], None, 16, LOW, HIGH)
    photo = prediction.read_photo(str(photo_path), str(mask_path), net.fov_diameter, net.multiple, "unet",
                               net.fov_diameter_max)
    work_diameter = fov_diameter(photo.fov) * photo.work.shape[-1] / photo.image.shape[1]
    assert work_diameter == pytest.approx(min(max(diameter, LOW), HIGH), rel=0.01)
    probs, _ = prediction.predict_photo(net, photo, settings(tmp_path))
    assert probs.shape[-2:] == photo.image.shape[:2]  # back at the photograph's own size
    assert torch.allclose(probs.sum(0), torch.ones(probs.shape[-2:]), atol=1e-5)  # still a distribution
    out = tmp_path / "mask.png"
    prediction.save_outputs(probs, photo.image, photo.fov, (str(out), "", ""), settings(tmp_path))
    mask = np.array(Image.open(out)) > 0
    size = mask.shape[0]
    # well inside the FOV, away from its dark border (which this stand-in also calls vessel)
    near = mask[size // 2 - size // 4:size // 2 + size // 4, left - 30:left + width + 30]
    widths = near.sum(axis=1)
    assert (np.abs(widths - width) <= 1).all(), (widths.min(), widths.max())
    columns = np.nonzero(near.any(axis=0))[0] + left - 30
    assert abs(columns.min() - left) <= 1 and abs(columns.max() - (left + width - 1)) <= 1  # in its place


def test_a_checkpoints_working_scale_reaches_predict(tmp_path):
    from tests.test_cohort import checkpoint
    path = checkpoint(tmp_path / "scaled.pth", fov_diameter=60)
    saved = torch.load(path, weights_only=True)
    saved["args"]["fov_diameter_max"] = 120
    torch.save(saved, path)
    net = prediction.open_network(path, torch.device("cpu"), argparse.Namespace(device="cpu", amp=False,
                                                                             amp_dtype=None, channels_last=False))
    assert (net.fov_diameter, net.fov_diameter_max) == (60, 120)
    for diameter in (40, 100, 300):  # enlarged to 60, kept, reduced to 120
        photo_path, mask_path, _ = vessel_photo(tmp_path, diameter, 2)
        photo = prediction.read_photo(str(photo_path), str(mask_path), net.fov_diameter, net.multiple, "unet",
                                   net.fov_diameter_max)
        native = fov_diameter(photo.fov)
        assert photo.work.shape[-1] == round(photo.image.shape[1] * min(max(native, 60), 120) / native)


def test_training_photographs_are_at_their_working_scale(tmp_path):
    samples = []
    for diameter in (40, 100, 300):
        photo, mask, _ = vessel_photo(tmp_path, diameter, 2)
        label = tmp_path / f"label_{diameter}.png"
        Image.fromarray((np.array(Image.open(photo))[..., 1] == 60).astype(np.uint8) * 255).save(label)
        samples.append(Sample(str(photo), str(label), str(mask)))
    data = VesselDataset(samples, None, fov="masks", fov_diameter=60, fov_diameter_max=120)
    for (img, target), expected in zip(data, (60, 100, 120)):
        assert fov_diameter(target.numpy() != 255) == pytest.approx(expected, abs=2)
        assert img.shape[-2:] == target.shape


@pytest.mark.parametrize("height,width", [(725, 1087), (300, 200)])
def test_the_random_resize_is_drawn_around_each_images_own_size(height, width):
    torch.manual_seed(0)
    short = min(height, width)
    drawn = [draw_short_side(0.5, 1.2, True, height, width) for _ in range(400)]
    assert min(drawn) >= math.floor(0.5 * short) and max(drawn) <= math.floor(1.2 * short)
    assert min(drawn) < 0.6 * short and max(drawn) > 1.1 * short  # the whole range is drawn
    # pixels (the tutorial's base size): the image's size plays no part, the draw is torchvision's
    torch.manual_seed(0)
    pixels = draw_short_side(100, 200, False, height, width)
    torch.manual_seed(0)
    assert pixels == int(torch.randint(100, 201, ()))


def bilinear_loop(values, size):
    """``values`` [C, h, w] resized to ``size`` by the formula of bilinear interpolation with half-pixel
    centres (align_corners=False), one output pixel at a time."""
    c, h, w = values.shape
    out = torch.zeros(c, *size, dtype=torch.float64)
    for i in range(size[0]):
        for j in range(size[1]):
            y = min(max((i + 0.5) * h / size[0] - 0.5, 0), h - 1)
            x = min(max((j + 0.5) * w / size[1] - 0.5, 0), w - 1)
            y0, x0 = int(y), int(x)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            fy, fx = y - y0, x - x0
            out[:, i, j] = ((1 - fy) * (1 - fx) * values[:, y0, x0] + (1 - fy) * fx * values[:, y0, x1]
                            + fy * (1 - fx) * values[:, y1, x0] + fy * fx * values[:, y1, x1])
    return out


@pytest.mark.parametrize("size", [(11, 13), (3, 4)])
def test_the_way_back_against_a_loop(size):
    from train_utils.inference import probabilities_at
    torch.manual_seed(0)
    probs = torch.randn(1, 3, 5, 6).mul(3).softmax(1)
    plain = bilinear_loop(probs[0].double(), size)
    assert torch.allclose(probabilities_at(probs, size, "probability")[0].double(), plain, atol=1e-6)
    logits = bilinear_loop(probs[0].double().log(), size)
    back = probabilities_at(probs, size, "log")[0].double()
    assert torch.allclose(back, logits.softmax(0), atol=1e-6)
    assert torch.allclose(back.sum(0), torch.ones(size, dtype=torch.float64), atol=1e-6)
