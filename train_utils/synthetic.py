"""Synthetic fundus photographs with exact vessel labels, written in the file layout of any dataset.

No test or demo needs real data: ``write_synthetic`` lays the images out as
the dataset's archive unpacks (names, formats, splits), so the same readers
(my_dataset.py) take them back. Deterministic for a given seed::

    python my_dataset.py --output-dir data/synthetic                  # DRIVE format: data/synthetic/DRIVE
    python -m train_utils.synthetic --dataset stare --output-dir data/stare --num-train 10 --num-test 5
"""
import gzip
import io
import json
import math
import os
import sys
from typing import NamedTuple

if __name__ == "__main__":  # python -m train_utils.synthetic: the flags are checked before numpy and torch load
    from train_utils.cli import synthetic_main
    sys.exit(synthetic_main(doc=__doc__))

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from my_dataset import CHASE_TRAIN_LAST, HRF_TRAIN_LAST

from .errors import UserError
from .imaging import palette_image, split_ext


# ---------------------------------------------------------------------------
# one photograph


def _vessel_tree(rng, height, width, scale, eye, disc):
    """The drawn vessel pixels of the trunks from the optic disc ``disc`` = (y, x, radius), branching and
    tapering, each ending at the width limit or at the rim of the field of view ``eye`` = (cy, cx, radius): two
    bool [H, W] maps, the trees of the even trunks (arteries) and of the odd ones (veins)."""
    (cy, cx, radius), (disc_y, disc_x, disc_r) = eye, disc
    canvases = [Image.new("L", (width, height), 0) for _ in range(2)]
    draws = [ImageDraw.Draw(c) for c in canvases]
    step = max(2.0, 5.0 * scale)
    n_trunks = int(rng.integers(4, 7))
    stack = []
    for k in range(n_trunks):
        angle = 2 * math.pi * k / n_trunks + rng.uniform(-0.3, 0.3)
        x0 = disc_x + 0.3 * disc_r * math.cos(angle)
        y0 = disc_y + 0.3 * disc_r * math.sin(angle)
        # Small images keep trunks at least 2.5 px wide, or the tree would vanish below min_width.
        stack.append((x0, y0, angle, max(rng.uniform(7.0, 10.0) * scale, 2.5), 0, k % 2))
    min_width = max(1.0, 1.2 * scale)
    segments = 0
    while stack and segments < 20000:
        x, y, angle, w, depth, tree = stack.pop()
        draw = draws[tree]
        curve = rng.normal(0, 0.02)
        while w >= min_width and segments < 20000:
            angle += curve + rng.normal(0, 0.12)
            nx, ny = x + step * math.cos(angle), y + step * math.sin(angle)
            if (ny - cy) ** 2 + (nx - cx) ** 2 > (radius * 1.02) ** 2:
                break
            wi = max(1, int(round(w)))
            draw.line([(x, y), (nx, ny)], fill=255, width=wi)
            if wi > 2:  # round joints, so turns leave no notches
                draw.ellipse([nx - wi / 2, ny - wi / 2, nx + wi / 2, ny + wi / 2], fill=255)
            x, y = nx, ny
            segments += 1
            w *= 0.992
            if depth < 6 and rng.random() < 0.05:
                branch = angle + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1)
                stack.append((x, y, branch, w * rng.uniform(0.55, 0.8), depth + 1, tree))
                w *= 0.9
    return [np.asarray(c) > 0 for c in canvases]


def _colour(rng, r2, d2, vessel, fov, scale, veins=None):
    """The photograph (uint8 [H, W, 3]) from the squared distances to the FOV's centre ``r2`` and to the disc's
    ``d2`` (in their radii): an orange-red retina darkening towards the rim, low-frequency blotches, the disc,
    the vessels (``veins``, when given, darker than the rest, as veins are); a nearly black border outside
    the FOV."""
    height, width = r2.shape
    base = np.array([0.80, 0.42, 0.25]) * rng.uniform(0.9, 1.1, size=3)
    shade = 1.0 - 0.45 * r2
    blotch = Image.fromarray((rng.random((height // 8 + 1, width // 8 + 1)) * 255).astype(np.uint8))
    blotch = blotch.resize((width, height), Image.BILINEAR).filter(ImageFilter.GaussianBlur(6 * scale + 1))
    blotch = np.asarray(blotch, dtype=np.float64) / 255.0 - 0.5
    img = base[None, None, :] * (shade + 0.15 * blotch)[..., None]
    img = img + np.exp(-d2 * 1.5)[..., None] * np.array([0.25, 0.35, 0.3])
    darken = np.array([0.82, 0.5, 0.65]) * rng.uniform(0.95, 1.05)
    img = np.where(vessel[..., None], img * darken, img)
    if veins is not None:
        img = np.where(veins[..., None], img * np.array([0.8, 0.75, 0.85]), img)
    img = np.clip(img * 255 + rng.normal(0, 4, img.shape), 0, 255)
    img = Image.fromarray(img.astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
    img = np.where(fov[..., None], np.asarray(img), rng.integers(0, 6, img.size[::-1] + (3,)))
    return img.astype(np.uint8)


def synthetic_fundus(height=584, width=565, seed=0, with_disc=False, with_av=False):
    """One synthetic fundus photograph: (RGB uint8 [H, W, 3], vessel bool [H, W], FOV bool [H, W]).

    A circular field of view with vignetting, a bright optic disc, and a vessel
    tree growing from the disc with branches that taper; the label is exactly
    the drawn vessel pixels inside the FOV. ``with_disc=True`` adds a fourth
    item, the optic disc (bool [H, W], inside the FOV), a second class to learn.
    ``with_av=True`` adds (last) an artery/vein label (uint8 [H, W]: 0, 1 artery,
    2 vein, 3 where they cross), every other trunk's tree a vein, drawn darker.
    """
    rng = np.random.default_rng(seed)
    scale = min(height, width) / 565.0
    cy, cx = (height - 1) / 2, (width - 1) / 2
    radius = 0.47 * min(height, width)
    yy, xx = np.mgrid[0:height, 0:width]
    r2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / radius ** 2
    fov = r2 <= 1.0

    side = rng.choice([-1, 1])
    disc_y = cy + rng.uniform(-0.08, 0.08) * radius
    disc_x = cx + side * rng.uniform(0.45, 0.6) * radius
    disc_r = rng.uniform(0.13, 0.17) * radius
    arteries, veins = (t & fov for t in _vessel_tree(rng, height, width, scale, (cy, cx, radius),
                                                      (disc_y, disc_x, disc_r)))
    vessel = arteries | veins
    d2 = ((yy - disc_y) ** 2 + (xx - disc_x) ** 2) / disc_r ** 2
    img = _colour(rng, r2, d2, vessel, fov, scale, veins if with_av else None)
    out = (img, vessel, fov) + (((d2 <= 1.0) & fov,) if with_disc else ())
    if with_av:
        out += ((arteries * np.uint8(1) + veins * np.uint8(2)),)  # 3 where both: a crossing
    return out


# ---------------------------------------------------------------------------
# dataset layouts


def write_synthetic_drive(root, num_train=20, num_test=20, height=584, width=565, seed=0, av=False):
    """Write a synthetic DRIVE-format dataset under ``root/DRIVE``; deterministic for a given seed.

    Numbering follows DRIVE: test images 01.., training images from 21 on
    (more than 20 test images push training numbers further). ``av``: with
    artery/vein labels in ``av/``, drawn in RITE's colours (``drive_av``).
    """
    first_train = max(21, num_test + 1)
    plan = [("test", i + 1) for i in range(num_test)] + [("training", first_train + i) for i in range(num_train)]
    for split, number in plan:
        d = os.path.join(root, "DRIVE", split)
        for sub in ("images", "1st_manual", "mask") + (("av",) if av else ()):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        # One independent stream per image, so an image does not depend on how many others there are.
        img, vessel, fov, *classes = synthetic_fundus(height, width, seed=[seed, number], with_av=av)
        nn_ = f"{number:02d}"
        if av:
            Image.fromarray(av_colours(classes[0])).save(os.path.join(d, "av", f"{nn_}_{split}.png"))
        Image.fromarray(img).save(os.path.join(d, "images", f"{nn_}_{split}.tif"))
        Image.fromarray(vessel.astype(np.uint8) * 255).save(os.path.join(d, "1st_manual", f"{nn_}_manual1.gif"))
        Image.fromarray(fov.astype(np.uint8) * 255).save(os.path.join(d, "mask", f"{nn_}_{split}_mask.gif"))
    params = dict(num_train=num_train, num_test=num_test, height=height, width=width, seed=seed)
    with open(os.path.join(root, "DRIVE", "synthetic.json"), "w") as f:
        json.dump(params, f)
    return root


def ensure_synthetic_drive(root, **params):
    """Write the synthetic sample unless ``root`` already holds one made with the same parameters."""
    marker = os.path.join(root, "DRIVE", "synthetic.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == params:
                return root
    print(f"writing synthetic DRIVE-format data to '{root}'", flush=True)
    return write_synthetic_drive(root, **params)


class _Request(NamedTuple):
    """What ``write_synthetic`` was asked for; recorded, with the layout, in the root's synthetic.json."""
    num_train: int
    num_test: int
    height: int
    width: int
    seed: int
    num_classes: int
    masks: bool

    def fundus(self, number):
        """Image ``number``'s photograph, vessels, FOV and disc: one independent stream per image."""
        return synthetic_fundus(self.height, self.width, seed=[self.seed, number], with_disc=True)


# Where each layout numbers its training and test images: (file stem, number for the seed).
def _chase_names(num_train, num_test):
    if num_train > 2 * CHASE_TRAIN_LAST or num_test > 8:
        raise UserError(f"the chase_db1 layout holds at most {2 * CHASE_TRAIN_LAST} training and 8 test images")
    name = lambda k, first: (f"Image_{first + k // 2:02d}{'LR'[k % 2]}", 100 + first + k)  # noqa: E731
    return [name(k, 1) for k in range(num_train)], [name(k, CHASE_TRAIN_LAST + 1) for k in range(num_test)]


def _hrf_names(num_train, num_test):
    if num_train > 3 * HRF_TRAIN_LAST or num_test > 3 * (15 - HRF_TRAIN_LAST):
        raise UserError(f"the hrf layout holds at most {3 * HRF_TRAIN_LAST} training and "
                        f"{3 * (15 - HRF_TRAIN_LAST)} test images")
    name = lambda k, first: (f"{first + k // 3:02d}_{('h', 'dr', 'g')[k % 3]}", 200 + first * 3 + k)  # noqa: E731
    return [name(k, 1) for k in range(num_train)], [name(k, HRF_TRAIN_LAST + 1) for k in range(num_test)]


def _save(array, path, mode=None, gz=False, **kw):
    """Save ``array`` as an image file; ``gz``: gzip-compressed, as STARE's archives hold them."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    if not gz:
        im.save(path, **kw)
        return
    buf = io.BytesIO()
    im.save(buf, format=split_ext(path)[1].lower().removesuffix(".gz").lstrip(".").upper(), **kw)
    with gzip.open(path, "wb") as f:
        f.write(buf.getvalue())


def _gray(b):
    return b.astype(np.uint8) * 255


def av_colours(classes):
    """An artery/vein label drawn as such labels are published: red artery, blue vein, green crossing."""
    rgb = np.zeros(classes.shape + (3,), np.uint8)
    for cls, colour in ((1, (255, 0, 0)), (2, (0, 0, 255)), (3, (0, 255, 0))):
        rgb[classes == cls] = colour
    return rgb


def _write_drive(root, r):
    write_synthetic_drive(root, r.num_train, r.num_test, r.height, r.width, r.seed)


def _write_drive_av(root, r):
    write_synthetic_drive(root, r.num_train, r.num_test, r.height, r.width, r.seed, av=True)


def _write_hrf_av(root, r):
    train, test = _hrf_names(r.num_train, r.num_test)
    for k, (stem, number) in enumerate(train + test):
        img, _, fov, classes = synthetic_fundus(r.height, r.width, seed=[r.seed, number], with_av=True)
        _save(img, os.path.join(root, "images", stem + (".JPG" if k % 2 else ".jpg")), quality=95)
        _save(_gray(fov), os.path.join(root, "mask", stem + "_mask.tif"))
        _save(classes, os.path.join(root, "av", stem + ".png"))  # class indices, as HRF's are often shared


def _write_chase_db1(root, r):
    train, test = _chase_names(r.num_train, r.num_test)
    for stem, number in train + test:
        img, vessel, _, _ = r.fundus(number)
        _save(img, os.path.join(root, stem + ".jpg"), quality=95)
        _save(_gray(vessel), os.path.join(root, stem + "_1stHO.png"), mode="1")
        _save(_gray(vessel), os.path.join(root, stem + "_2ndHO.png"), mode="1")


def _write_stare(root, r):
    stems = [(f"im{k + 1:04d}", 300 + k) for k in range(r.num_train + r.num_test)]
    for stem, number in stems:
        img, vessel, _, _ = r.fundus(number)
        _save(img, os.path.join(root, "stare-images", stem + ".ppm.gz"), gz=True)
        _save(_gray(vessel), os.path.join(root, "labels-ah", stem + ".ah.ppm.gz"), mode="RGB", gz=True)
        _save(_gray(vessel), os.path.join(root, "labels-vk", stem + ".vk.ppm.gz"), mode="RGB", gz=True)
    img, _, _, _ = r.fundus(399)  # a photograph without a label, as most of STARE's 400
    _save(img, os.path.join(root, "stare-images", f"im{len(stems) + 1:04d}.ppm.gz"), gz=True)


def _write_hrf(root, r):
    train, test = _hrf_names(r.num_train, r.num_test)
    for k, (stem, number) in enumerate(train + test):
        img, vessel, fov, _ = r.fundus(number)
        ext = ".JPG" if k % 2 else ".jpg"  # the archive has both
        _save(img, os.path.join(root, "images", stem + ext), quality=95)
        _save(_gray(vessel), os.path.join(root, "manual1", stem + ".tif"))
        _save(_gray(fov), os.path.join(root, "mask", stem + "_mask.tif"))


def _write_folder(root, r):
    for split, count, first in (("training", r.num_train, 1), ("test", r.num_test, 1 + r.num_train)):
        for k in range(count):
            stem = f"sample{first + k:03d}"
            img, vessel, fov, disc = r.fundus(400 + first + k)
            d = os.path.join(root, split)
            _save(img, os.path.join(d, "images", stem + ".png"))
            if r.num_classes == 1:
                _save(_gray(vessel), os.path.join(d, "labels", stem + ".png"))
            else:
                classes = np.where(vessel, 1, np.where(disc, 2, 0))
                os.makedirs(os.path.join(d, "labels"), exist_ok=True)
                # black background, green vessels, red disc; white (255) for anything ignored
                palette_image(classes, [(0, 0, 0), (0, 255, 0), (255, 0, 0)], other=(255, 255, 255)).save(
                    os.path.join(d, "labels", stem + ".png"))
            if r.masks:
                _save(_gray(fov), os.path.join(d, "masks", stem + "_mask.png"))


# One writer per dataset of my_dataset.DATASETS: (root, _Request) -> None.
WRITERS = {"drive": _write_drive, "chase_db1": _write_chase_db1, "stare": _write_stare, "hrf": _write_hrf,
           "folder": _write_folder, "drive_av": _write_drive_av, "hrf_av": _write_hrf_av}


def write_synthetic(root, dataset="drive", num_train=20, num_test=20, height=584, width=565, seed=0,
                    num_classes=1, masks=True):
    """Write synthetic data in the file layout of ``dataset`` (one of ``WRITERS``) under ``root``.

    Deterministic for a given seed. ``drive`` is ``write_synthetic_drive``.
    Every layout's reader takes the images back with their standard split;
    for ``stare`` that is the first 10 labelled images for training, so
    write ``num_train=10`` to get the asked-for split (one unlabelled
    photograph is added, which the reader skips). ``drive_av`` and ``hrf_av`` add artery/vein labels (RITE's
    colours, class indices) and draw the veins darker. ``folder`` writes PNGs:
    0/255 labels for ``num_classes=1``, else palette labels with class 1
    vessels and class 2 the optic disc; ``masks=False`` leaves out ``masks/``.
    """
    if dataset not in WRITERS:
        raise UserError(f"unknown dataset '{dataset}' (choose from {', '.join(WRITERS)})")
    if dataset != "folder" and num_classes != 1:
        raise UserError(f"the {dataset} layout has one foreground class (vessels); use --dataset folder")
    if num_classes not in (1, 2):
        raise UserError("synthetic folder data has 1 (vessels) or 2 (vessels, optic disc) foreground classes")
    request = _Request(num_train, num_test, height, width, seed, num_classes, masks)
    WRITERS[dataset](root, request)
    if dataset not in ("drive", "drive_av"):  # write_synthetic_drive records its parameters in DRIVE/synthetic.json
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, "synthetic.json"), "w") as f:
            json.dump(dict(layout=dataset, **request._asdict()), f)
    return root


# ---------------------------------------------------------------------------
# command line


def main(args):
    """Write the data ``train_utils.cli.synthetic_parser``'s flags ask for."""
    if min(args.num_train, args.num_test) < 0 or min(args.height, args.width) < 32:
        raise UserError("counts must be >= 0 and height/width >= 32")
    write_synthetic(args.output_dir, args.dataset, args.num_train, args.num_test, args.height, args.width,
                    args.seed, args.num_classes, args.masks)
    where = os.path.join(args.output_dir, "DRIVE") if args.dataset in ("drive", "drive_av") else args.output_dir
    print(f"wrote {args.num_train} training and {args.num_test} test images ({args.dataset} layout) to '{where}'")

