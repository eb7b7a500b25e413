"""Labels stay on their vessels through the training preset's random geometry (resize, flips, crop)."""
import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from train_utils.transforms import DRIVE_MEAN, DRIVE_STD, SegmentationPresetTrain

SPACING = 13  # px between lines: an odd spacing puts the lines at every phase of the resampled grid


def line_images(size=240, vertical=True):
    """1-px lines every SPACING px in both the image (white on black) and the label (1 on 0)."""
    img = torch.zeros(3, size, size, dtype=torch.uint8)
    target = torch.zeros(size, size, dtype=torch.uint8)
    for c in range(8, size - 8, SPACING):
        if vertical:
            img[:, :, c] = 255
            target[:, c] = 1
        else:
            img[:, c, :] = 255
            target[c, :] = 1
    return img, target


def label_offsets(img, target, vertical=True):
    """Signed offsets (px) of every label line from the intensity centroid of its image line.

    Measured along each row (vertical lines) or column (horizontal lines) of the
    part of the output the resize filled (target != 255), away from its borders.
    """
    x = img[0].double() * DRIVE_STD[0] + DRIVE_MEAN[0]  # undo the normalisation of channel 0
    t = target
    if not vertical:
        x, t = x.T, t.T
    valid_rows = (t != 255).any(dim=1).nonzero().flatten()
    offsets = []
    for r in valid_rows[2:-2:3].tolist():
        row_x, row_t = x[r].numpy(), t[r].numpy()
        inside = np.flatnonzero(row_t != 255)
        lo, hi = inside.min() + 3, inside.max() - 3
        on = np.flatnonzero(row_t == 1)
        # Runs of consecutive label pixels: one per line the label kept.
        runs = np.split(on, np.flatnonzero(np.diff(on) > 1) + 1) if on.size else []
        for run in runs:
            centre = run.mean()
            a, b = int(np.floor(centre - 3)), int(np.ceil(centre + 3)) + 1
            if a < lo or b > hi:
                continue
            w = row_x[a:b] - row_x[a:b].min()
            if w.sum() <= 0:
                continue
            offsets.append(centre - (np.arange(a, b) * w).sum() / w.sum())
    return np.array(offsets)


@pytest.mark.parametrize("crop_first", [False, True])
@pytest.mark.parametrize("vertical", [True, False])
def test_train_preset_keeps_labels_on_their_lines(vertical, crop_first):
    """Over many random scales (0.5x to 1.2x) and flips, a label sits under 0.1 px off its image on average.

    Per sample, the offset is the mean signed offset of its label lines (a flip mirrors its sign, so
    the size of each sample's offset is averaged). torchvision's legacy NEAREST for the mask put it
    about 0.5 px off the image at every scale but 1; a centre-aligned nearest (as PIL's, the
    tutorial's) keeps it on the line.
    """
    base = 240
    # No crop: the whole image. crop_first: the same geometry sampled by RandomResizeRotateCrop (with no angle).
    preset = SegmentationPresetTrain(base_size=base, crop_size=int(1.2 * base) + 1, crop_first=crop_first)
    img, target = line_images(base, vertical)
    sizes, means = set(), []
    for seed in range(12):
        torch.manual_seed(seed)
        out_img, out_t = preset(img, target)
        sizes.add(int((out_t != 255).any(dim=1).sum()))
        off = label_offsets(out_img, out_t, vertical)
        assert off.size >= 10, f"seed {seed}: too few lines found"
        means.append(off.mean())
    assert len(sizes) >= 8, f"the preset drew too few distinct scales: {sorted(sizes)}"
    bias = float(np.mean(np.abs(means)))
    assert bias < 0.1, f"labels sit {bias:.3f} px off their image lines on average"
    # No single scale is biased by more than nearest-neighbour sampling allows (a quarter pixel).
    assert max(abs(m) for m in means) < 0.3, [round(m, 3) for m in means]


def mismatch(white, target, dy=0, dx=0):
    """Share of labelled pixels (not 255) where ``white`` disagrees with the label moved by (dy, dx) pixels."""
    t = torch.roll(target, shifts=(dy, dx), dims=(0, 1))
    valid = (t != 255) & (target != 255)
    return float((white != (t == 1))[valid].float().mean())


def block_images(size=160, block=8, seed=0):
    """Random 8-px blocks, white in the image where the label is 1: after any geometry they must still agree."""
    g = torch.Generator().manual_seed(seed)
    cells = (torch.rand(size // block, size // block, generator=g) < 0.4).to(torch.uint8)
    target = cells.repeat_interleave(block, 0).repeat_interleave(block, 1)
    img = (target * 255).expand(3, size, size).contiguous()
    return img, target


@pytest.mark.parametrize("seed", range(6))
def test_rotation_keeps_labels_on_the_image_and_ignores_what_came_from_outside(seed):
    """--rotate: the mask (nearest) agrees with the thresholded image (bilinear) except on block edges, far less
    than a mask one pixel off would; pixels rotated in from outside are 255 in the mask and 0 in the image."""
    from train_utils.transforms import RandomRotate

    img, target = block_images(seed=seed)
    torch.manual_seed(seed)
    out_img, out_t = RandomRotate(180)(tv_tensors.Image(img), tv_tensors.Mask(target))
    assert out_img.shape == img.shape and out_t.shape == target.shape
    inside = out_t != 255
    assert set(out_t.unique().tolist()) <= {0, 1, 255}
    assert 0 < (~inside).float().mean() < 0.5  # some corners came from outside (any angle but 0, 90, 180)
    assert out_img[:, ~inside].max() <= 127  # from outside: black, at most blended with an edge pixel
    assert out_t[0, 0] == 255 or out_t[0, -1] == 255 or out_t[-1, 0] == 255 or out_t[-1, -1] == 255
    white = out_img[0] > 127
    disagree = (white != (out_t == 1))[inside].float().mean()
    shifted = (white[:, 1:] != (out_t[:, :-1] == 1))[inside[:, :-1] & inside[:, 1:]].float().mean()
    assert disagree < 0.01, float(disagree)
    assert shifted > 3 * disagree and shifted > 0.02, (float(disagree), float(shifted))


def test_train_preset_with_rotation_and_colour_keeps_labels_and_ignore():
    """The whole preset with --rotate (and resize, flips, crop): the label agrees with the image except on
    block edges; with --color-jitter too, the mask keeps its classes and an ignored FOV border stays 255."""
    from train_utils.transforms import RandomPhotometric

    img, target = block_images(size=160)
    target = target.clone()
    target[:, :20] = 255  # an ignored band, like the border outside the FOV
    img[:, :, :20] = 0
    geometry = SegmentationPresetTrain(base_size=160, crop_size=96, rotate=90)
    full = SegmentationPresetTrain(base_size=160, crop_size=96, rotate=90, color_jitter=0.3)
    labels, counts = set(), []
    for seed in range(8):
        torch.manual_seed(seed)
        out_img, out_t = geometry(img, target)
        white = out_img[0] * DRIVE_STD[0] + DRIVE_MEAN[0] > 0.5
        # Resizing to half and rotating blur the 8-px blocks, so their edges disagree a little; a label
        # one pixel off in any direction would disagree at least twice as often.
        assert mismatch(white, out_t) < 0.5 * min(mismatch(white, out_t, dy, dx)
                                                   for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)))
        torch.manual_seed(seed)
        out_img, out_t = full(img, target)
        assert out_img.shape == (3, 96, 96) and out_t.shape == (96, 96) and out_t.dtype == torch.int64
        labels |= set(out_t.unique().tolist())
        counts.append(int((out_t == 255).sum()))
    assert labels == {0, 1, 255} and max(counts) > 0

    # The photometric step alone: the mask is the same object's values, the image changed.
    torch.manual_seed(1)
    new_img, new_t = RandomPhotometric(0.3)(tv_tensors.Image(img), tv_tensors.Mask(target))
    assert torch.equal(new_t, target) and not torch.equal(new_img, img)
    assert new_img.dtype == torch.uint8


def test_sensor_noise_touches_the_image_only_with_its_drawn_strength():
    """--noise: on half the crops, Gaussian noise of a standard deviation drawn from [0, S], clipped to [0, 1];
    the mask and the geometry are those of the same seed without it."""
    from train_utils.transforms import RandomNoise

    grey = tv_tensors.Image(torch.full((3, 200, 200), 0.5))
    target = tv_tensors.Mask(torch.randint(0, 2, (200, 200), dtype=torch.int64))
    sds, kept = [], 0
    for seed in range(40):
        torch.manual_seed(seed)
        out, t = RandomNoise(0.08)(grey, target)
        assert torch.equal(t, target) and out.min() >= 0 and out.max() <= 1
        sd = float((out - 0.5).std())
        kept += sd == 0
        sds.append(sd)
    assert 10 <= kept <= 30  # about half the crops are left clean
    noisy = [s for s in sds if s > 0]
    assert max(noisy) < 0.08 * 1.05 and min(noisy) < 0.04 < max(noisy)  # spread over [0, S]
    assert torch.equal(RandomNoise(0.08, p=0.0)(grey, target)[0], grey)
    # In the preset: the same draws of geometry as without noise, so the same labels.
    img, target = block_images(size=160)
    for seed in range(4):
        torch.manual_seed(seed)
        clean_img, clean_t = SegmentationPresetTrain(base_size=160, crop_size=96, rotate=90)(img, target)
        torch.manual_seed(seed)
        noisy_img, noisy_t = SegmentationPresetTrain(base_size=160, crop_size=96, rotate=90, noise=0.05)(img, target)
        assert torch.equal(clean_t, noisy_t)
        assert noisy_img.shape == clean_img.shape
