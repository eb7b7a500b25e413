"""The DRIVE dataset (``DriveDataset`` and its ``collate_fn``) and a writer of synthetic DRIVE-format data.

Layout read and written (``ROOT`` is what ``--data-path`` names)::

    ROOT/DRIVE/{training,test}/images/NN_{training,test}.tif
    ROOT/DRIVE/{training,test}/1st_manual/NN_manual1.gif
    ROOT/DRIVE/{training,test}/mask/NN_{training,test}_mask.gif

Run ``python my_dataset.py --out data/synthetic`` to write a synthetic sample.
"""
import argparse
import json
import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import Dataset

from train_utils.errors import UserError, run_cli

SPLITS = {True: "training", False: "test"}
IGNORE_INDEX = 255


def drive_files(root, split):
    """Sorted (image, manual label, FOV mask) paths of one split; a clear error for anything missing."""
    data_root = os.path.join(root, "DRIVE", split)
    if not os.path.isdir(data_root):
        raise UserError(f"path '{data_root}' does not exist: --data-path must name the folder that holds DRIVE/")
    img_dir = os.path.join(data_root, "images")
    if not os.path.isdir(img_dir):
        raise UserError(f"folder '{img_dir}' does not exist")
    # Sorted: os.listdir's order differs between file systems, and so would the runs.
    names = sorted(n for n in os.listdir(img_dir) if n.lower().endswith((".tif", ".tiff")))
    if not names:
        raise UserError(f"no .tif images in '{img_dir}'")
    files = []
    for name in names:
        number = name.split("_")[0]
        manual = os.path.join(data_root, "1st_manual", f"{number}_manual1.gif")
        mask = os.path.join(data_root, "mask", f"{number}_{split}_mask.gif")
        for kind, path in (("label", manual), ("FOV mask", mask)):
            if not os.path.isfile(path):
                raise UserError(f"{kind} file '{path}' for image '{name}' does not exist")
        files.append((os.path.join(img_dir, name), manual, mask))
    return files


def read_image(path, mode):
    """Decode an image file into a numpy array of the given PIL mode ('RGB' or 'L'), closing the file."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert(mode))
    except FileNotFoundError:
        raise UserError(f"file '{path}' does not exist") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot decode image '{path}': {e}") from None


def binary_from_gray(gray):
    """0/255 (or 0/1) gray levels as a bool map.

    Labels or masks that were resized with interpolation have grey edges: a
    pixel counts as set when it is at least 128 (half of 255). A file whose
    maximum is 1 is read as a 0/1 image.
    """
    if gray.max() == 1:
        return gray == 1
    return gray >= 128


def read_binary(path, img_path, shape):
    """A label or FOV mask as a bool map, checked to be the size (H, W) of its image ``img_path``."""
    arr = binary_from_gray(read_image(path, "L"))
    if arr.shape != tuple(shape):
        raise UserError(f"'{path}' is {arr.shape[1]}x{arr.shape[0]} but its image '{img_path}' is "
                        f"{shape[1]}x{shape[0]} (width x height)")
    return arr


def load_sample(img_path, manual_path, mask_path):
    """(image uint8 [3, H, W], target uint8 [H, W]) with target 0/1 inside the FOV and 255 outside."""
    img = read_image(img_path, "RGB")
    vessel = read_binary(manual_path, img_path, img.shape[:2])
    fov = read_binary(mask_path, img_path, img.shape[:2])
    target = np.where(fov, vessel.astype(np.uint8), IGNORE_INDEX).astype(np.uint8)
    return torch.from_numpy(img).permute(2, 0, 1).contiguous(), torch.from_numpy(target)


class DriveDataset(Dataset):
    """DRIVE split as (image, target) pairs; target is 0/1 vessel inside the FOV and 255 outside.

    With ``cache=True`` (the default) every file is decoded once, when the
    dataset is built: DRIVE is small (20 images, ~1 MB each decoded), decoding a
    TIFF costs more than the whole augmentation, and a broken file is reported
    before training starts. Augmentation still runs per sample.
    """

    def __init__(self, root: str, train: bool, transforms=None, cache: bool = True):
        super().__init__()
        self.flag = SPLITS[bool(train)]
        files = drive_files(root, self.flag)
        self.img_list = [f[0] for f in files]
        self.manual = [f[1] for f in files]
        self.roi_mask = [f[2] for f in files]
        self.transforms = transforms
        self._cache = [load_sample(*f) for f in files] if cache else None

    def __len__(self):
        return len(self.img_list)

    def __getitem__(self, idx):
        if self._cache is not None:
            img, target = self._cache[idx]
        else:
            img, target = load_sample(self.img_list[idx], self.manual[idx], self.roi_mask[idx])
        if self.transforms is not None:
            img, target = self.transforms(img, target)
        return img, target

    @staticmethod
    def collate_fn(batch):
        images, targets = list(zip(*batch))
        return cat_list(images, fill_value=0), cat_list(targets, fill_value=IGNORE_INDEX)


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


def synthetic_fundus(height=584, width=565, seed=0):
    """One synthetic fundus photograph: (RGB uint8 [H, W, 3], vessel bool [H, W], FOV bool [H, W]).

    A circular field of view with vignetting, a bright optic disc, and a vessel
    tree growing from the disc with branches that taper; the label is exactly
    the drawn vessel pixels inside the FOV.
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
    parser = argparse.ArgumentParser(description="Write synthetic DRIVE-format data", add_help=add_help)
    parser.add_argument("--out", default="data/synthetic", help="root folder; DRIVE/ is written inside it")
    parser.add_argument("--num-train", default=20, type=int)
    parser.add_argument("--num-test", default=20, type=int)
    parser.add_argument("--height", default=584, type=int)
    parser.add_argument("--width", default=565, type=int)
    parser.add_argument("--seed", default=0, type=int)
    return parser


def main(args):
    if min(args.num_train, args.num_test) < 0 or min(args.height, args.width) < 32:
        raise UserError("counts must be >= 0 and height/width >= 32")
    write_synthetic_drive(args.out, args.num_train, args.num_test, args.height, args.width, args.seed)
    print(f"wrote {args.num_train} training and {args.num_test} test images to '{os.path.join(args.out, 'DRIVE')}'")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
