"""The vessel datasets (DRIVE, CHASE_DB1, STARE, HRF, any folder), ``DriveDataset`` and a synthetic-data writer.

Each dataset is read from the folder its archive unpacks to (``ROOT`` is what
``--data-path`` names); ``--dataset`` picks the layout::

    drive      ROOT/DRIVE/{training,test}/images/NN_{training,test}.tif
               ROOT/DRIVE/{training,test}/1st_manual/NN_manual1.gif
               ROOT/DRIVE/{training,test}/mask/NN_{training,test}_mask.gif
    chase_db1  ROOT/Image_NNX.jpg, ROOT/Image_NNX_1stHO.png (X = L/R; no FOV masks)
               images 01-10 train, 11-14 test
    stare      ROOT/stare-images/imNNNN.ppm[.gz], ROOT/labels-ah/imNNNN.ah.ppm[.gz] (no FOV masks)
               the first 10 labelled images train, the others test
    hrf        ROOT/images/NN_{h,dr,g}.jpg, ROOT/manual1/NN_{h,dr,g}.tif, ROOT/mask/NN_{h,dr,g}_mask.tif
               01-05 of each category train, 06-15 test
    folder     ROOT/{training,test}/images/*, ROOT/{training,test}/labels/* and optionally .../masks/*,
               matched by file stem; any format Pillow reads, gzip-compressed (.gz) too

Without FOV masks the field of view is estimated from the photograph's dark
border (``fov="estimate"``, as predict.py does) or every pixel counts (``fov="all"``).

Run ``python my_dataset.py --out data/synthetic`` to write a synthetic DRIVE-format
sample, ``--layout`` for the other layouts.
"""
import argparse
import gzip
import io
import json
import math
import os
import re
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import Dataset

from train_utils.errors import UserError, run_cli

SPLITS = {True: "training", False: "test"}
IGNORE_INDEX = 255
DATASETS = ("drive", "chase_db1", "stare", "hrf", "folder")
FOV_MODES = ("estimate", "all")
# Standard splits of the datasets that ship without one.
CHASE_TRAIN_LAST = 10  # Image_01..10 (both eyes) train, 11..14 test
STARE_TRAIN_COUNT = 10  # the first 10 labelled images train
HRF_TRAIN_LAST = 5  # 01..05 of each category train, 06..15 test
# Suffixes Pillow decodes that these datasets use (a trailing .gz is allowed too).
IMAGE_EXTS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".ppm", ".pgm", ".pbm", ".pnm")


class Sample(NamedTuple):
    """The files of one image: photograph, label, FOV mask (None: the dataset has none)."""
    image: str
    label: str
    mask: Optional[str]


# ---------------------------------------------------------------------------
# reading files


def split_ext(name):
    """(stem, extension) with a trailing ``.gz`` kept in the extension: ``im0001.ppm.gz`` -> ``im0001``."""
    base, ext = os.path.splitext(name)
    if ext.lower() == ".gz":
        base, inner = os.path.splitext(base)
        ext = inner + ext
    return base, ext


def is_image_name(name):
    ext = split_ext(name)[1].lower()
    return ext.removesuffix(".gz") in IMAGE_EXTS


def open_image(path):
    """``PIL.Image.open`` that also reads gzip-compressed files (``.ppm.gz`` as STARE's archives unpack)."""
    if path.lower().endswith(".gz"):
        with gzip.open(path, "rb") as f:
            return Image.open(io.BytesIO(f.read()))
    return Image.open(path)


def _decode(path, convert):
    try:
        with open_image(path) as im:
            return convert(im)
    except FileNotFoundError:
        raise UserError(f"file '{path}' does not exist") from None
    except (OSError, EOFError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot decode image '{path}': {e}") from None


def read_image(path, mode):
    """Decode an image file into a numpy array of the given PIL mode ('RGB' or 'L'), closing the file."""
    return _decode(path, lambda im: np.array(im.convert(mode)))


def image_size(path):
    """(width, height) of an image file; decodes only the header unless the file is gzip-compressed."""
    return _decode(path, lambda im: im.size)


def binary_from_gray(gray):
    """0/255 (or 0/1) gray levels as a bool map.

    Labels or masks that were resized with interpolation have grey edges: a
    pixel counts as set when it is at least 128 (half of 255). A file whose
    maximum is 1 is read as a 0/1 image.
    """
    if gray.max() == 1:
        return gray == 1
    return gray >= 128


def _check_shape(arr, path, img_path, shape):
    if arr.shape != tuple(shape):
        raise UserError(f"'{path}' is {arr.shape[1]}x{arr.shape[0]} but its image '{img_path}' is "
                        f"{shape[1]}x{shape[0]} (width x height)")
    return arr


def read_binary(path, img_path, shape):
    """A label or FOV mask as a bool map, checked to be the size (H, W) of its image ``img_path``."""
    return _check_shape(binary_from_gray(read_image(path, "L")), path, img_path, shape)


def _class_indices(im):
    """The pixel values of a label image as class indices: palette indices for 'P', gray levels otherwise."""
    if im.mode in ("P", "L"):
        return np.array(im)
    if im.mode == "1":
        return np.array(im).astype(np.uint8)
    if im.mode in ("I", "I;16", "I;16B", "I;16L"):
        return np.array(im).astype(np.int64)
    if im.mode in ("RGB", "RGBA"):
        arr = np.array(im)
        if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all():
            return arr[..., 0]  # a grey label saved as RGB (STARE's .ppm)
    raise ValueError(f"a label must be a class-index (grey) or palette image, not mode {im.mode}")


def _grey_palette(im):
    """Whether a palette image's used colours are all grey (a binary mask saved as GIF/PNG with a palette)."""
    palette = np.array(im.getpalette() or [], dtype=np.int64).reshape(-1, 3)
    used = np.unique(np.array(im))
    used = used[used < len(palette)]
    colours = palette[used]
    return bool((colours[:, 0] == colours[:, 1]).all() and (colours[:, 1] == colours[:, 2]).all())


def _label_values(im, num_classes):
    """(values, are class indices): grey levels for a one-class label, as the tutorial reads DRIVE's GIFs;
    class indices for more classes, and for colour-palette images (the VOC convention) always."""
    if num_classes == 1 and not (im.mode == "P" and not _grey_palette(im)):
        return np.array(im.convert("L")), False
    return _class_indices(im), True


def read_label(path, img_path, shape, num_classes=1):
    """A label file as uint8 class indices [H, W], 255 = ignored.

    One foreground class (``num_classes=1``): 0/255 images (also 0/1; grey
    interpolated edges split at 128), or 0/1 with 255 ignored. More classes
    (or a colour palette): class-index or palette images holding
    0..num_classes, and 255 for ignored pixels.
    """
    try:
        values, indices = _decode(path, lambda im: _label_values(im, num_classes))
    except UserError as e:
        if "a label must be" in str(e):
            raise UserError(f"label '{path}': {str(e).split(': ', 1)[1]}") from None
        raise
    _check_shape(values, path, img_path, shape)
    present = set(np.unique(values).tolist())
    if num_classes == 1 and not indices:
        if 1 in present and present <= {0, 1, IGNORE_INDEX}:
            return values.astype(np.uint8)
        return binary_from_gray(values).astype(np.uint8)
    bad = sorted(v for v in present if v > num_classes and v != IGNORE_INDEX)
    if bad:
        raise UserError(f"label '{path}' holds class {bad[0]}, but --num-classes {num_classes} allows "
                        f"0..{num_classes} (and {IGNORE_INDEX} for ignored pixels)")
    return values.astype(np.uint8)


def field_of_view(img, mask_path, img_path, fov="estimate"):
    """The FOV of one photograph: its mask file, else estimated (as predict.py does) or everything."""
    if mask_path is not None:
        return read_binary(mask_path, img_path, img.shape[:2])
    if fov == "all":
        return np.ones(img.shape[:2], dtype=bool)
    from train_utils.inference import estimate_fov  # torch-heavy module, needed only for mask-less data
    return estimate_fov(img)[0]


def load_sample(img_path, label_path, mask_path, num_classes=1, fov="estimate"):
    """(image uint8 [3, H, W], target uint8 [H, W]) with the label's classes inside the FOV and 255 outside."""
    img = read_image(img_path, "RGB")
    label = read_label(label_path, img_path, img.shape[:2], num_classes)
    inside = field_of_view(img, mask_path, img_path, fov)
    target = np.where(inside, label, IGNORE_INDEX).astype(np.uint8)
    return torch.from_numpy(img).permute(2, 0, 1).contiguous(), torch.from_numpy(target)


# ---------------------------------------------------------------------------
# dataset layouts: each returns the sorted samples of one split ("training" or "test")


def _require_dir(path, what):
    if not os.path.isdir(path):
        raise UserError(f"folder '{path}' does not exist ({what})")
    return path


def _files(folder):
    # Sorted: os.listdir's order differs between file systems, and so would the runs.
    return sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)))


def _need(path, kind, image):
    if not os.path.isfile(path):
        raise UserError(f"{kind} file '{path}' for image '{image}' does not exist")
    return path


def drive_files(root, split):
    """Sorted (image, manual label, FOV mask) paths of one split; a clear error for anything missing."""
    data_root = os.path.join(root, "DRIVE", split)
    if not os.path.isdir(os.path.join(root, "DRIVE")):
        raise UserError(f"path '{os.path.join(root, 'DRIVE')}' does not exist: --data-path must name the folder "
                        "that holds DRIVE/")
    if not os.path.isdir(data_root):
        return []  # a DRIVE root with one split only: the caller says whether that split is needed
    img_dir = os.path.join(data_root, "images")
    if not os.path.isdir(img_dir):
        raise UserError(f"folder '{img_dir}' does not exist")
    names = [n for n in _files(img_dir) if n.lower().endswith((".tif", ".tiff"))]
    if not names:
        raise UserError(f"no .tif images in '{img_dir}'")
    files = []
    for name in names:
        number = name.split("_")[0]
        manual = _need(os.path.join(data_root, "1st_manual", f"{number}_manual1.gif"), "label", name)
        mask = _need(os.path.join(data_root, "mask", f"{number}_{split}_mask.gif"), "FOV mask", name)
        files.append(Sample(os.path.join(img_dir, name), manual, mask))
    return files


def chase_db1_files(root, split):
    """CHASE_DB1 as its archive unpacks: one flat folder; the label is the first observer's (1stHO)."""
    pattern = re.compile(r"^Image_(\d+)([LR])\.jpg$", re.IGNORECASE)
    folder = _require_dir(root, "--data-path for chase_db1: the folder holding Image_NNX.jpg")
    names = [n for n in _files(folder) if pattern.match(n)]
    if not names:
        raise UserError(f"no CHASE_DB1 photographs (Image_NNX.jpg) in '{folder}'")
    train = split == "training"
    files = []
    for name in names:
        if (int(pattern.match(name).group(1)) <= CHASE_TRAIN_LAST) != train:
            continue
        label = _need(os.path.join(folder, split_ext(name)[0] + "_1stHO.png"), "label", name)
        files.append(Sample(os.path.join(folder, name), label, None))
    return files


def _by_stem(folder):
    """{stem: file name} of the image files in ``folder`` (``.gz`` allowed); empty if there is no such folder.

    One listing per folder, looked up per image.
    """
    if not os.path.isdir(folder):
        return {}
    return {split_ext(n)[0]: n for n in _files(folder) if is_image_name(n)}


def stare_files(root, split):
    """STARE as its archives unpack: photographs and Hoover's labels (labels-ah), possibly gzip-compressed."""
    img_dir = _require_dir(os.path.join(root, "stare-images"), "STARE's photographs")
    label_dir = _require_dir(os.path.join(root, "labels-ah"), "STARE's labels by A. Hoover")
    pattern = re.compile(r"^(im\d+)\.ppm(\.gz)?$", re.IGNORECASE)
    labelled, unlabelled = [], []
    label_names = _by_stem(label_dir)
    for name in _files(img_dir):
        m = pattern.match(name)
        if not m:
            continue
        label = label_names.get(m.group(1) + ".ah")
        if label is None:
            unlabelled.append(name)
        else:
            labelled.append(Sample(os.path.join(img_dir, name), os.path.join(label_dir, label), None))
    if not labelled:
        raise UserError(f"no labelled STARE photographs (imNNNN.ppm with labels-ah/imNNNN.ah.ppm) in '{root}'")
    if unlabelled and split == "training":
        print(f"note: {len(unlabelled)} STARE photograph{'s' * (len(unlabelled) > 1)} without a vessel label "
              f"skipped ({unlabelled[0]}{', ...' if len(unlabelled) > 1 else ''})")
    return labelled[:STARE_TRAIN_COUNT] if split == "training" else labelled[STARE_TRAIN_COUNT:]


def hrf_files(root, split):
    """HRF as its archive unpacks: images/, manual1/ and mask/ (healthy, diabetic retinopathy, glaucoma)."""
    img_dir = _require_dir(os.path.join(root, "images"), "HRF's photographs")
    pattern = re.compile(r"^(\d+)_(h|dr|g)\.jpe?g$", re.IGNORECASE)
    names = [n for n in _files(img_dir) if pattern.match(n)]
    if not names:
        raise UserError(f"no HRF photographs (NN_h.jpg, NN_dr.jpg, NN_g.jpg) in '{img_dir}'")
    train = split == "training"
    label_dir, mask_dir = os.path.join(root, "manual1"), os.path.join(root, "mask")
    labels, masks = _by_stem(label_dir), _by_stem(mask_dir)
    files = []
    for name in names:
        number, kind = pattern.match(name).groups()
        if (int(number) <= HRF_TRAIN_LAST) != train:
            continue
        stem = f"{number}_{kind.lower()}"
        label = _need(os.path.join(label_dir, labels.get(stem, stem + ".tif")), "label", name)
        mask = _need(os.path.join(mask_dir, masks.get(stem + "_mask", stem + "_mask.tif")), "FOV mask", name)
        files.append(Sample(os.path.join(img_dir, name), label, mask))
    return files


def folder_files(root, split):
    """Any dataset laid out as ROOT/{training,test}/{images,labels[,masks]}/, files matched by stem.

    A mask may be named as its image or ``<stem>_mask``.
    """
    base = _require_dir(os.path.join(root, split), f"the {split} split of a folder dataset")
    img_dir = _require_dir(os.path.join(base, "images"), "photographs")
    label_dir = _require_dir(os.path.join(base, "labels"), "labels")
    mask_dir = os.path.join(base, "masks")
    labels = _by_stem(label_dir)
    masks = _by_stem(mask_dir) if os.path.isdir(mask_dir) else None
    files = []
    for name in (n for n in _files(img_dir) if is_image_name(n)):
        stem = split_ext(name)[0]
        if stem not in labels:
            raise UserError(f"no label for image '{os.path.join(img_dir, name)}' in '{label_dir}' "
                            f"(looked for {stem}.*)")
        mask = None
        if masks is not None:
            found = masks.get(stem) or masks.get(stem + "_mask")
            if found is None:
                raise UserError(f"no FOV mask for image '{name}' in '{mask_dir}' (looked for {stem}.* and "
                                f"{stem}_mask.*); remove masks/ to estimate every image's FOV")
            mask = os.path.join(mask_dir, found)
        files.append(Sample(os.path.join(img_dir, name), os.path.join(label_dir, labels[stem]), mask))
    return files


READERS = {"drive": drive_files, "chase_db1": chase_db1_files, "stare": stare_files, "hrf": hrf_files,
           "folder": folder_files}


def dataset_files(name, root, split):
    """The samples of ``split`` ("training" or "test") of dataset ``name`` under ``root``; may be empty."""
    if name not in READERS:
        raise UserError(f"unknown dataset '{name}' (choose from {', '.join(DATASETS)})")
    return READERS[name](root, split)


def holdout(num_images, count, seed=0):
    """Indices of ``count`` of ``num_images`` training images held out for validation: a seeded, sorted choice."""
    if not 0 < count < num_images:
        raise UserError(f"--val-split {count} must hold out at least 1 and fewer than the {num_images} training "
                        "images")
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(num_images, size=count, replace=False).tolist())


# ---------------------------------------------------------------------------
# datasets


class VesselDataset(Dataset):
    """(image, target) pairs of a list of ``Sample``; target is the label's classes inside the FOV, 255 outside.

    With ``cache=True`` (the default) every file is decoded once, when the
    dataset is built: these datasets are small (tens of images), decoding a
    TIFF or JPEG costs more than the whole augmentation, the FOV of a mask-less
    photograph is estimated once, and a broken file is reported before
    training starts. Augmentation still runs per sample.
    """

    def __init__(self, samples, transforms=None, cache=True, num_classes=1, fov="estimate"):
        super().__init__()
        self.samples = list(samples)
        self.img_list = [s.image for s in self.samples]
        self.manual = [s.label for s in self.samples]
        self.roi_mask = [s.mask for s in self.samples]
        self.num_classes = num_classes
        self.fov = fov
        self.transforms = transforms
        self._cache = [self._load(i) for i in range(len(self.samples))] if cache else None

    def _load(self, idx):
        s = self.samples[idx]
        return load_sample(s.image, s.label, s.mask, self.num_classes, self.fov)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, idx):
        img, target = self._cache[idx] if self._cache is not None else self._load(idx)
        if self.transforms is not None:
            img, target = self.transforms(img, target)
        return img, target

    def image_sizes(self):
        """(height, width) of every image."""
        if self._cache is not None:
            return [tuple(img.shape[1:]) for img, _ in self._cache]
        return [image_size(p)[::-1] for p in self.img_list]

    @staticmethod
    def collate_fn(batch):
        images, targets = list(zip(*batch))
        return cat_list(images, fill_value=0), cat_list(targets, fill_value=IGNORE_INDEX)


class DriveDataset(VesselDataset):
    """The tutorial's DRIVE split (``train=True``: training, else test); target is 0/1 vessel inside the FOV
    and 255 outside."""

    def __init__(self, root: str, train: bool, transforms=None, cache: bool = True):
        self.flag = SPLITS[bool(train)]
        samples = drive_files(root, self.flag)
        if not samples:
            raise UserError(f"path '{os.path.join(root, 'DRIVE', self.flag)}' does not exist")
        super().__init__(samples, transforms=transforms, cache=cache)


def cat_list(tensors, fill_value=0):
    """Stack tensors of different sizes, padding each on the right/bottom to the largest with ``fill_value``."""
    if all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(tensors)
    max_size = tuple(max(s) for s in zip(*[t.shape for t in tensors]))
    batched = tensors[0].new_full((len(tensors),) + max_size, fill_value)
    for t, pad_t in zip(tensors, batched):
        pad_t[tuple(slice(0, s) for s in t.shape)].copy_(t)
    return batched


collate_fn = DriveDataset.collate_fn


# ---------------------------------------------------------------------------
# synthetic DRIVE-format data


def synthetic_fundus(height=584, width=565, seed=0, with_disc=False):
    """One synthetic fundus photograph: (RGB uint8 [H, W, 3], vessel bool [H, W], FOV bool [H, W]).

    A circular field of view with vignetting, a bright optic disc, and a vessel
    tree growing from the disc with branches that taper; the label is exactly
    the drawn vessel pixels inside the FOV. ``with_disc=True`` adds a fourth
    item, the optic disc (bool [H, W], inside the FOV), a second class to learn.
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

    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    step = max(2.0, 5.0 * scale)
    n_trunks = int(rng.integers(4, 7))
    stack = []
    for k in range(n_trunks):
        angle = 2 * math.pi * k / n_trunks + rng.uniform(-0.3, 0.3)
        x0 = disc_x + 0.3 * disc_r * math.cos(angle)
        y0 = disc_y + 0.3 * disc_r * math.sin(angle)
        # Small images keep trunks at least 2.5 px wide, or the tree would vanish below min_width.
        stack.append((x0, y0, angle, max(rng.uniform(7.0, 10.0) * scale, 2.5), 0))
    min_width = max(1.0, 1.2 * scale)
    segments = 0
    while stack and segments < 20000:
        x, y, angle, w, depth = stack.pop()
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
                stack.append((x, y, branch, w * rng.uniform(0.55, 0.8), depth + 1))
                w *= 0.9
    vessel = (np.asarray(canvas) > 0) & fov

    # Colour: an orange-red retina darkening towards the rim, low-frequency blotches, the disc, the vessels.
    base = np.array([0.80, 0.42, 0.25]) * rng.uniform(0.9, 1.1, size=3)
    shade = 1.0 - 0.45 * r2
    blotch = Image.fromarray((rng.random((height // 8 + 1, width // 8 + 1)) * 255).astype(np.uint8))
    blotch = blotch.resize((width, height), Image.BILINEAR).filter(ImageFilter.GaussianBlur(6 * scale + 1))
    blotch = np.asarray(blotch, dtype=np.float64) / 255.0 - 0.5
    img = base[None, None, :] * (shade + 0.15 * blotch)[..., None]
    d2 = ((yy - disc_y) ** 2 + (xx - disc_x) ** 2) / disc_r ** 2
    img = img + np.exp(-d2 * 1.5)[..., None] * np.array([0.25, 0.35, 0.3])
    darken = np.array([0.82, 0.5, 0.65]) * rng.uniform(0.95, 1.05)
    img = np.where(vessel[..., None], img * darken, img)
    img = np.clip(img * 255 + rng.normal(0, 4, img.shape), 0, 255)
    img = Image.fromarray(img.astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
    img = np.where(fov[..., None], np.asarray(img), rng.integers(0, 6, img.size[::-1] + (3,)))
    if with_disc:
        return img.astype(np.uint8), vessel, fov, (d2 <= 1.0) & fov
    return img.astype(np.uint8), vessel, fov


def write_synthetic_drive(root, num_train=20, num_test=20, height=584, width=565, seed=0):
    """Write a synthetic DRIVE-format dataset under ``root/DRIVE``; deterministic for a given seed.

    Numbering follows DRIVE: test images 01.., training images from 21 on
    (more than 20 test images push training numbers further).
    """
    first_train = max(21, num_test + 1)
    plan = [("test", i + 1) for i in range(num_test)] + [("training", first_train + i) for i in range(num_train)]
    for split, number in plan:
        d = os.path.join(root, "DRIVE", split)
        for sub in ("images", "1st_manual", "mask"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        # One independent stream per image, so an image does not depend on how many others there are.
        img, vessel, fov = synthetic_fundus(height, width, seed=[seed, number])
        nn_ = f"{number:02d}"
        Image.fromarray(img).save(os.path.join(d, "images", f"{nn_}_{split}.tif"))
        Image.fromarray(vessel.astype(np.uint8) * 255).save(os.path.join(d, "1st_manual", f"{nn_}_manual1.gif"))
        Image.fromarray(fov.astype(np.uint8) * 255).save(os.path.join(d, "mask", f"{nn_}_{split}_mask.gif"))
    params = dict(num_train=num_train, num_test=num_test, height=height, width=width, seed=seed)
    with open(os.path.join(root, "DRIVE", "synthetic.json"), "w") as f:
        json.dump(params, f)
    return root


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


def palette_image(classes, colours, other=(0, 0, 0)):
    """A palette ('P') image of uint8 class indices: class c drawn in ``colours[c]``, classes beyond in ``other``.

    Class-index PNGs that open in any viewer: predict.py's masks, the synthetic palette labels.
    """
    im = Image.fromarray(classes.astype(np.uint8))  # 'L'; putpalette makes it 'P' with the same indices
    im.putpalette([v for c in range(256) for v in (colours[c] if c < len(colours) else other)])
    return im


def write_synthetic(root, layout="drive", num_train=20, num_test=20, height=584, width=565, seed=0,
                    num_classes=1, masks=True):
    """Write synthetic data in the file layout of ``layout`` (one of ``DATASETS``) under ``root``.

    Deterministic for a given seed. ``drive`` is ``write_synthetic_drive``.
    Every layout's reader takes the images back with their standard split;
    for ``stare`` that is the first 10 labelled images for training, so
    write ``num_train=10`` to get the asked-for split (one unlabelled
    photograph is added, which the reader skips). ``folder`` writes PNGs:
    0/255 labels for ``num_classes=1``, else palette labels with class 1
    vessels and class 2 the optic disc; ``masks=False`` leaves out ``masks/``.
    """
    if layout == "drive":
        return write_synthetic_drive(root, num_train, num_test, height, width, seed)
    if layout not in DATASETS:
        raise UserError(f"unknown layout '{layout}' (choose from {', '.join(DATASETS)})")
    if layout != "folder" and num_classes != 1:
        raise UserError(f"the {layout} layout has one foreground class (vessels); use --layout folder")
    if num_classes not in (1, 2):
        raise UserError("synthetic folder data has 1 (vessels) or 2 (vessels, optic disc) foreground classes")

    def fundus(number):  # one independent stream per image, as write_synthetic_drive
        return synthetic_fundus(height, width, seed=[seed, number], with_disc=True)

    def gray(b):
        return b.astype(np.uint8) * 255

    if layout == "chase_db1":
        train, test = _chase_names(num_train, num_test)
        for stem, number in train + test:
            img, vessel, _, _ = fundus(number)
            _save(img, os.path.join(root, stem + ".jpg"), quality=95)
            _save(gray(vessel), os.path.join(root, stem + "_1stHO.png"), mode="1")
            _save(gray(vessel), os.path.join(root, stem + "_2ndHO.png"), mode="1")
    elif layout == "stare":
        stems = [(f"im{k + 1:04d}", 300 + k) for k in range(num_train + num_test)]
        for stem, number in stems:
            img, vessel, _, _ = fundus(number)
            _save(img, os.path.join(root, "stare-images", stem + ".ppm.gz"), gz=True)
            _save(gray(vessel), os.path.join(root, "labels-ah", stem + ".ah.ppm.gz"), mode="RGB", gz=True)
            _save(gray(vessel), os.path.join(root, "labels-vk", stem + ".vk.ppm.gz"), mode="RGB", gz=True)
        img, _, _, _ = fundus(399)  # a photograph without a label, as most of STARE's 400
        _save(img, os.path.join(root, "stare-images", f"im{len(stems) + 1:04d}.ppm.gz"), gz=True)
    elif layout == "hrf":
        train, test = _hrf_names(num_train, num_test)
        for k, (stem, number) in enumerate(train + test):
            img, vessel, fov, _ = fundus(number)
            ext = ".JPG" if k % 2 else ".jpg"  # the archive has both
            _save(img, os.path.join(root, "images", stem + ext), quality=95)
            _save(gray(vessel), os.path.join(root, "manual1", stem + ".tif"))
            _save(gray(fov), os.path.join(root, "mask", stem + "_mask.tif"))
    else:
        for split, count, first in (("training", num_train, 1), ("test", num_test, 1 + num_train)):
            for k in range(count):
                stem = f"sample{first + k:03d}"
                img, vessel, fov, disc = fundus(400 + first + k)
                d = os.path.join(root, split)
                _save(img, os.path.join(d, "images", stem + ".png"))
                if num_classes == 1:
                    _save(gray(vessel), os.path.join(d, "labels", stem + ".png"))
                else:
                    classes = np.where(vessel, 1, np.where(disc, 2, 0))
                    os.makedirs(os.path.join(d, "labels"), exist_ok=True)
                    # black background, green vessels, red disc; white (255) for anything ignored
                    palette_image(classes, [(0, 0, 0), (0, 255, 0), (255, 0, 0)], other=(255, 255, 255)).save(
                        os.path.join(d, "labels", stem + ".png"))
                if masks:
                    _save(gray(fov), os.path.join(d, "masks", stem + "_mask.png"))
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "synthetic.json"), "w") as f:
        json.dump(dict(layout=layout, num_train=num_train, num_test=num_test, height=height, width=width,
                       seed=seed, num_classes=num_classes, masks=masks), f)
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


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description="Write synthetic fundus data in a dataset's file layout",
                                     add_help=add_help)
    parser.add_argument("--out", default="data/synthetic", help="root folder (drive: DRIVE/ is written inside it)")
    parser.add_argument("--layout", default="drive", choices=DATASETS, help="whose file names and formats")
    parser.add_argument("--num-train", default=20, type=int)
    parser.add_argument("--num-test", default=20, type=int)
    parser.add_argument("--height", default=584, type=int)
    parser.add_argument("--width", default=565, type=int)
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--num-classes", default=1, type=int,
                        help="folder layout: 2 adds the optic disc as a second class (palette labels)")
    parser.add_argument("--no-masks", dest="masks", action="store_false", help="folder layout: no masks/ folder")
    return parser


def main(args):
    if min(args.num_train, args.num_test) < 0 or min(args.height, args.width) < 32:
        raise UserError("counts must be >= 0 and height/width >= 32")
    write_synthetic(args.out, args.layout, args.num_train, args.num_test, args.height, args.width, args.seed,
                    args.num_classes, args.masks)
    where = os.path.join(args.out, "DRIVE") if args.layout == "drive" else args.out
    print(f"wrote {args.num_train} training and {args.num_test} test images ({args.layout} layout) to '{where}'")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
