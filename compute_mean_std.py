"""Per-channel mean and std of a dataset's images inside their field of view (FOV), for ``--mean``/``--std``.

Example::

    python compute_mean_std.py --data-path ./ --split training
    python compute_mean_std.py --dataset stare --data-path STARE

``--data-path`` names the folder that holds ``DRIVE/`` (or, with
``--dataset``, the folder another dataset's archive unpacks to, as train.py
reads it). Every pixel inside the FOV of every image of the split counts
once (the FOV mask, or for datasets without masks the FOV estimated from the
dark border, as train.py and predict.py estimate it), in units of [0, 1]
(pixel / 255), and the std is the population std (ddof=0) of all those pixels
pooled. The figures are exact: per-channel histograms of the 8-bit values are
summed as integers, so nothing is rounded until the final division.

For comparison it also prints what the original ``compute_mean_std.py``
computed: the average over images of each image's own FOV mean and std. The
means agree up to the weighting by FOV size; the averaged std is smaller than
the pooled one, because it leaves out how much the images differ from each
other.

The last line is ready to paste into ``train.py``'s command line.
"""
import math

from train_utils.cli import compute_mean_std_parser as get_args_parser

if __name__ == "__main__":  # first, before numpy and torch load: --help and mistyped flags are answered at once
    cli_args = get_args_parser(doc=__doc__).parse_args()

import numpy as np

from my_dataset import dataset_files
from train_utils.errors import UserError, run_cli
from train_utils.imaging import field_of_view, read_image

CHANNELS = 3
DECIMALS = 4
_LEVELS = np.arange(256, dtype=np.int64)


def _moments(hist):
    """(n, sum, sum of squares) per channel of a [C, 256] histogram of 8-bit values, as exact Python ints."""
    n = int(hist[0].sum())
    s = [int(h @ _LEVELS) for h in hist]
    ss = [int(h @ (_LEVELS * _LEVELS)) for h in hist]
    return n, s, ss


def _mean_std(n, s, ss):
    """Mean and population std in units of [0, 1] from exact integer moments of 0..255 values."""
    mean = [si / (n * 255) for si in s]
    # n*ss - s^2 is exact in Python ints; int / int is correctly rounded.
    std = [math.sqrt((n * ssi - si * si) / (n * n * 255 * 255)) for si, ssi in zip(s, ss)]
    return mean, std


def compute_mean_std(root, split="training", dataset="drive", fov="estimate"):
    """Statistics of one split's images inside the FOV, in units of [0, 1].

    Returns a dict:

    - ``mean``, ``std``: per channel, over all FOV pixels of all images pooled
      (population std, ddof=0);
    - ``image_avg_mean``, ``image_avg_std``: per channel, the average over
      images of each image's own FOV mean and std (the original script's figures);
    - ``num_images``, ``num_pixels`` (FOV pixels in all, per channel).
    """
    files = dataset_files(dataset, root, split)
    if not files:
        raise UserError(f"the {dataset} dataset in '{root}' has no {split} images")
    total = np.zeros((CHANNELS, 256), dtype=np.int64)
    image_means, image_stds = [], []
    for img_path, _, mask_path in files:
        img = read_image(img_path, "RGB")
        pixels = img[field_of_view(img, mask_path, img_path, fov)]  # [n, 3] uint8 (an empty FOV is an error)
        hist = np.stack([np.bincount(pixels[:, c], minlength=256) for c in range(CHANNELS)]).astype(np.int64)
        total += hist
        mean, std = _mean_std(*_moments(hist))
        image_means.append(mean)
        image_stds.append(std)

    num_pixels, s, ss = _moments(total)
    mean, std = _mean_std(num_pixels, s, ss)
    k = len(files)
    return {
        "mean": mean,
        "std": std,
        "image_avg_mean": [math.fsum(m[c] for m in image_means) / k for c in range(CHANNELS)],
        "image_avg_std": [math.fsum(m[c] for m in image_stds) / k for c in range(CHANNELS)],
        "num_images": k,
        "num_pixels": num_pixels,
    }


def _fmt(values):
    return " ".join(f"{v:.{DECIMALS}f}" for v in values)


def main(args):
    r = compute_mean_std(args.data_path, args.split, args.dataset, args.fov)
    print(f"dataset: {args.dataset}, split: {args.split}, images: {r['num_images']}, FOV pixels: {r['num_pixels']}")
    print("pooled over all FOV pixels:")
    print(f"  mean: {_fmt(r['mean'])}")
    print(f"  std:  {_fmt(r['std'])}")
    print("average of per-image FOV figures (the original compute_mean_std.py):")
    print(f"  mean: {_fmt(r['image_avg_mean'])}")
    print(f"  std:  {_fmt(r['image_avg_std'])}")
    print(f"--mean {_fmt(r['mean'])} --std {_fmt(r['std'])}")
    return r


if __name__ == "__main__":
    run_cli(main, cli_args, debug=cli_args.debug)
