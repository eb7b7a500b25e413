"""The crop-first geometry (``RandomResizeRotateCrop``) against the chain of whole-image transforms it replaces.

The two must draw the same scales, angles, flips and windows. That is measured
from their outputs, not read from their parameters: the source photograph
encodes each pixel's own position (x in red, y in green), so an affine fit of
the output's colours gives back where each crop came from, at what scale and
angle.
"""
import math

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from train_utils.transforms import (RandomResizeRotateCrop, SegmentationPresetTrain, affine_crop_map, resized_size,
                                    sample_bilinear, sample_nearest)

H, W, CROP = 200, 220, 96
PLAIN = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # the output is the image / 255


def position_image(height=H, width=W):
    """Red = x, green = y, each as 0..255 over the image; label 1 everywhere (255 in the output: outside)."""
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                          indexing="ij")
    img = torch.stack((x * 255 / (width - 1), y * 255 / (height - 1), torch.zeros_like(x))).round().to(torch.uint8)
    return img, torch.ones(height, width, dtype=torch.uint8)


def recovered_geometry(img, target, height=H, width=W):
    """(scale, angle in degrees, flipped, centre x, centre y) of one crop, by a least-squares affine fit of the
    source positions its pixels show, away from the edges of the part the source filled."""
    inside = (target == 1).numpy()
    core = inside.copy()
    for axis in (0, 1):  # 2 px in from the source's edges: the bilinear image blends with the fill there
        for shift in (-2, -1, 1, 2):
            core &= np.roll(inside, shift, axis=axis)
    core[:2], core[-2:], core[:, :2], core[:, -2:] = False, False, False, False
    ys, xs = np.nonzero(core)
    if len(xs) < 50:
        return None
    source_x = img[0].double().numpy()[ys, xs] * 255 * (width - 1) / 255
    source_y = img[1].double().numpy()[ys, xs] * 255 * (height - 1) / 255
    design = np.stack((xs, ys, np.ones_like(xs)), 1).astype(np.float64)
    (a, b, c), (d, e, f) = (np.linalg.lstsq(design, v, rcond=None)[0] for v in (source_x, source_y))
    det = a * e - b * d
    centre = (CROP - 1) / 2
    # The map is R(angle) times a flip; a flip of both axes is R(180) and one flip is the other's R(180), so
    # the angle of the first column, taken modulo 180, is the drawn angle whatever the flips.
    return (1 / math.sqrt(abs(det)), fold(math.degrees(math.atan2(d, a))), det < 0,
            a * centre + b * centre + c, d * centre + e * centre + f)


def fold(angle):
    """An angle in degrees, modulo 180, in [-90, 90)."""
    return (angle + 90) % 180 - 90


def presets(**kw):
    kw = dict(base_size=H, crop_size=CROP, **PLAIN, **kw)
    return SegmentationPresetTrain(crop_first=False, **kw), SegmentationPresetTrain(crop_first=True, **kw)


def test_same_draws_recovered_from_the_crops():
    """For each seed, both samplers cut the same window at the same scale, angle and flips, read from their
    output; over 120 seeds the draws cover the recipe's ranges, and the random stream ends in the same state."""
    chain, crop_first = presets(rotate=90.0)
    img, target = position_image()
    found = {"chain": [], "crop_first": []}
    for seed in range(120):
        states = []
        for name, preset in (("chain", chain), ("crop_first", crop_first)):
            torch.manual_seed(seed)
            out, out_t = preset(img, target)
            states.append(torch.rand(3))
            found[name].append(recovered_geometry(out, out_t))
        assert torch.equal(states[0], states[1]), f"seed {seed}: the samplers used the random stream differently"
    pairs = [(a, b) for a, b in zip(found["chain"], found["crop_first"]) if a is not None and b is not None]
    assert len(pairs) >= 100
    for a, b in pairs:
        assert abs(a[0] / b[0] - 1) < 0.02, f"scale {a[0]:.3f} against {b[0]:.3f}"
        assert abs(fold(a[1] - b[1])) < 1.0, f"angle {a[1]:.2f} against {b[1]:.2f}"
        assert a[2] == b[2], "flipped in one sampler only"
        assert math.hypot(a[3] - b[3], a[4] - b[4]) < 1.5, f"window centre {a[3:]} against {b[3:]}"
    # The statistics of the two: equal means and spreads of scale, angle and window centre.
    chain_draws, crop_draws = (np.array([p[k] for p in pairs], dtype=np.float64) for k in (0, 1))
    crop_draws[:, 1] = chain_draws[:, 1] + [fold(d) for d in crop_draws[:, 1] - chain_draws[:, 1]]  # no wrap at 90
    for i, what, tol in [(0, "scale", 0.005), (1, "angle", 0.3), (3, "centre x", 0.5), (4, "centre y", 0.5)]:
        x, y = chain_draws[:, i], crop_draws[:, i]
        assert abs(x.mean() - y.mean()) < tol, f"{what}: means {x.mean():.3f} and {y.mean():.3f}"
        assert abs(x.std() - y.std()) < tol, f"{what}: spreads {x.std():.3f} and {y.std():.3f}"
    # The draws cover the recipe's ranges: scale [0.5, 1.2] x base / shorter side (here base = shorter side),
    # angles over [-90, 90], windows across the image, mirrored and not.
    scales, angles = crop_draws[:, 0], crop_draws[:, 1]
    assert 0.49 < scales.min() < 0.6 and 1.1 < scales.max() < 1.22, (scales.min(), scales.max())
    assert angles.min() < -70 and angles.max() > 70
    assert np.ptp(crop_draws[:, 3]) > 60 and np.ptp(crop_draws[:, 4]) > 60
    assert 0.3 < crop_draws[:, 2].mean() < 0.7


def test_without_rotation_the_labels_are_the_chains_exactly():
    """With no angle, the window's map is a resize, flips and a crop: every label pixel is the one the chain's
    centre-aligned nearest resize puts there, and the image differs only by the resize's filter."""
    chain, crop_first = presets(rotate=0.0)
    gen = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=gen)
    smooth = torch.nn.functional.interpolate(img[None, :, ::10, ::10].float(), size=(H, W), mode="bilinear")[0]
    target = torch.randint(0, 2, (H, W), dtype=torch.uint8, generator=gen)
    target[:, :7] = 255
    ties = 0
    for seed in range(30):
        torch.manual_seed(seed)
        a, ta = chain(smooth.round().to(torch.uint8), target)
        torch.manual_seed(seed)
        b, tb = crop_first(smooth.round().to(torch.uint8), target)
        # Where the source point lies exactly between two pixels (a tie: x + 0.5 an integer) the chain's float32
        # resize and this float64 map may round to different sides; everywhere else the labels are the same.
        torch.manual_seed(seed)
        matrix = crop_first.transforms.transforms[0].make_params([tv_tensors.Image(img)])["map"]
        tie_x = is_tie(matrix[0, 0] * torch.arange(CROP, dtype=torch.float64) + matrix[0, 2])
        tie_y = is_tie(matrix[1, 1] * torch.arange(CROP, dtype=torch.float64) + matrix[1, 2])
        differ = ta != tb
        assert not differ[~tie_y][:, ~tie_x].any(), f"seed {seed}: labels differ away from ties"
        ties += int(differ.any())
        inside = ta != 255
        assert (a - b).abs()[:, inside].mean() * 255 < 2.0
    assert ties < 15


def is_tie(points):
    return ((points + 0.5) - (points + 0.5).round()).abs() < 1e-6


@pytest.mark.parametrize("size", [(40, 50), (CROP, CROP), (300, 150)])
def test_small_and_odd_sources_fill_outside(size):
    """Sources smaller than the crop, square or tall: the crop is full-size, 255 where the source is not."""
    h, w = size
    img = torch.full((3, h, w), 200, dtype=torch.uint8)
    target = torch.ones(h, w, dtype=torch.uint8)
    t = RandomResizeRotateCrop(min(h, w) // 2, min(h, w), 45.0, CROP)
    for seed in range(10):
        torch.manual_seed(seed)
        out, out_t = t(tv_tensors.Image(img), tv_tensors.Mask(target))
        assert out.shape == (3, CROP, CROP) and out_t.shape == (CROP, CROP) and out.dtype == torch.float32
        assert set(out_t.unique().tolist()) <= {1, 255}
        assert 0 <= out.min() and out.max() <= 1  # as ToDtype(scale=True) would make the uint8 image
        # Labelled pixels lie inside the source; those away from its edge show its grey exactly.
        assert (out[:, out_t == 1] > 0).all()
        assert ((out[0] - 200 / 255).abs() < 1e-5).float().sum() >= 0.8 * (out_t == 1).sum() - 4 * CROP
        if h < CROP and w < CROP:
            assert (out_t == 255).any()


def test_a_window_beyond_the_source_is_all_fill():
    """A map that reads nothing of the source (a rotated image's empty corner) gives 0 and 255 throughout."""
    img = torch.full((3, 50, 60), 90, dtype=torch.uint8)
    target = torch.ones(50, 60, dtype=torch.uint8)
    matrix = affine_crop_map(50, 60, 50, 60, 0.0, False, False, 500, 500)
    assert sample_bilinear(img, matrix, 32).eq(0).all()
    assert sample_nearest(target, matrix, 32).eq(255).all()


def test_map_against_a_loop_over_the_chain():
    """``affine_crop_map`` against the chain written out point by point: crop, flips, rotation, resize."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(20, 400, 2))
        short = int(rng.integers(10, 500))
        rh, rw = resized_size(h, w, short)
        angle, hflip, vflip = float(rng.uniform(-90, 90)), bool(rng.integers(2)), bool(rng.integers(2))
        top, left = int(rng.integers(0, 50)), int(rng.integers(0, 50))
        matrix = affine_crop_map(h, w, rh, rw, angle, hflip, vflip, top, left).numpy()
        for x, y in rng.uniform(-1, 60, (5, 2)):
            X, Y = x + left, y + top
            X, Y = (rw - 1 - X if hflip else X), (rh - 1 - Y if vflip else Y)
            u, v = X - (rw - 1) / 2, Y - (rh - 1) / 2
            t = math.radians(angle)
            xr, yr = (rw - 1) / 2 + u * math.cos(t) - v * math.sin(t), (rh - 1) / 2 + u * math.sin(t) + v * math.cos(t)
            xs, ys = (xr + 0.5) * w / rw - 0.5, (yr + 0.5) * h / rh - 0.5
            assert np.allclose(matrix @ [x, y, 1.0], [xs, ys], atol=1e-9)


def test_resized_size_is_torchvisions():
    from torchvision.transforms.v2 import functional as F
    for h, w, s in [(584, 565, 300), (960, 999, 480), (100, 100, 37), (2336, 3504, 1168), (7, 300, 5)]:
        assert resized_size(h, w, s) == tuple(F.resize(torch.zeros(1, h, w), [s]).shape[-2:])


def test_rotation_keeps_labels_on_their_image():
    """Discs drawn in both image and label, inside the circle any rotation keeps: after any draw (angle, scale,
    flips) the label's centroid sits on the image's, under 0.1 px apart on average and without a bias. (The
    chain, which rounds the label twice, resize then rotation, is 0.16 px off on these discs.)"""
    size = 240
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    target = torch.zeros(size, size, dtype=torch.uint8)
    for cy, cx in [(60, 70), (150, 160), (110, 120), (180, 60), (70, 175)]:
        target[((yy - cy) ** 2 + (xx - cx) ** 2) <= 25 ** 2] = 1
    img = (target * 255).expand(3, size, size).contiguous()
    crop = size + 60  # larger than any draw: every disc stays whole in the crop
    preset = SegmentationPresetTrain(base_size=size, crop_size=crop, rotate=90.0, **PLAIN)
    grid_y, grid_x = torch.meshgrid(torch.arange(crop, dtype=torch.float64), torch.arange(crop, dtype=torch.float64),
                                    indexing="ij")
    offsets = []
    for seed in range(40):
        torch.manual_seed(seed)
        out, out_t = preset(img, target)
        w, lab = out[0].double(), (out_t == 1).double()
        offsets.append([float((g * w).sum() / w.sum() - (g * lab).sum() / lab.sum()) for g in (grid_x, grid_y)])
    offsets = np.array(offsets)
    assert np.hypot(*offsets.T).mean() < 0.1, f"labels sit {np.hypot(*offsets.T).mean():.3f} px off their image"
    assert np.abs(offsets.mean(0)).max() < 0.03, f"labels are biased by {offsets.mean(0)} px"


def test_the_preset_samples_crop_first_only_with_a_rotation():
    """The tutorial's preset (no rotation) keeps its chain of whole-image transforms, and its numbers; --rotate
    (--recipe fast) samples crop-first."""
    from train_utils.transforms import RandomResize, get_transform
    tutorial = get_transform(True).transforms.transforms
    assert isinstance(tutorial[0], RandomResize) and not any(isinstance(t, RandomResizeRotateCrop) for t in tutorial)
    fast = get_transform(True, crop_size=256, rotate=90.0, color_jitter=0.2).transforms.transforms
    assert isinstance(fast[0], RandomResizeRotateCrop) and fast[0].crop_size == 256 and fast[0].degrees == 90.0


def test_benchmark_photos_mode_times_both_samplers(tmp_path):
    """benchmarks/benchmark.py --mode photos on tiny photographs: one row per sampler with its epoch, the time it
    waited for data and the ratio against the chain."""
    import json

    from tests.conftest import run_script
    out_json = tmp_path / "photos.json"
    r = run_script("benchmarks/benchmark.py", "--mode", "photos", "--photo-sizes", "64x60", "--images", 2,
                   "--epochs", 2, "--rounds", 1, "--json", out_json, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(out_json) as f:
        samples = json.load(f)["samples"]["64x60"]
    assert set(samples) == {"chain", "crop-first"}
    for (sample,) in samples.values():
        assert len(sample["epochs"]) == 2 and sample["steps"] == 2  # 2 images x 4 crops in batches of 4
        assert all(0 <= e["data_s"] < e["epoch_s"] and math.isfinite(e["loss"]) for e in sample["epochs"])
    rows = [line for line in r.stdout.splitlines() if line.startswith("| 64 x 60 |")]
    assert len(rows) == 2 and "| chain |" in rows[0] and "| 1.00x |" in rows[0] and "| crop-first |" in rows[1]


@pytest.mark.parametrize("flags, want, source", [
    ([], False, "derived"), (["--recipe", "fast"], True, "derived"), (["--rotate", "30"], True, "derived"),
    (["--recipe", "fast", "--no-crop-first"], False, "flag"), (["--crop-first"], True, "flag")])
def test_crop_first_setting_and_the_datasets_geometry(drive_root, flags, want, source):
    """--crop-first is decided with the other settings (on with a rotation) and reaches the training preset."""
    import train
    from train_utils.settings import Machine, resolve_settings
    from train_utils.transforms import RandomResize

    args = train.parse_args(train.get_args_parser(), ["--data-path", drive_root, *flags])
    s = resolve_settings(args, None, Machine(default_device="cpu", cpu_bf16=False), train.dataset_facts)
    assert (s.crop_first, s.source("crop_first")) == (want, source)
    (_, train_set), = train.build_datasets(s)[0]
    first = train_set.transforms.transforms.transforms[0]
    assert isinstance(first, RandomResizeRotateCrop if want else RandomResize)
