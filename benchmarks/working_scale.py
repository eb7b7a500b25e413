"""Dice of predicted masks on held-out photographs for each working scale and each way back to the
photograph's size: the ablation of the shipped model's resolution choices (docs/model_card.md).

    python benchmarks/working_scale.py --dataset drive chase_db1 stare hrf \\
        --data-path DRIVE_ROOT CHASEDB1 STARE HRF --weights weights/unet_vessels.pth \\
        --fov-diameter-max model 0 --space probability log

Every photograph is predicted with predict.py's own functions (``read_photo``,
``run_network``): its FOV from the dataset's mask, else estimated from the
dark border; brought to the model's working scale; flips averaged as the
checkpoint's validation did. ``--fov-diameter-max`` overrides the
checkpoint's largest working FOV diameter (``model``: the checkpoint's own;
0: every photograph at ``--fov-diameter``), and ``--space`` names how the
probabilities go back to the photograph's size
(``train_utils.inference.probabilities_at``). The network runs once per
weights, scale and noise; each way back reuses its output.

``--noise`` adds Gaussian noise of each standard deviation (in the
photograph's 0-255 levels, seeded, every pixel and channel) to the
photograph before it is brought to the working scale: a camera noisier than
the training ones. Scores are the vessels' (every class but the background, so an artery/vein model's
arteries and veins together) dice, sensitivity, specificity, centreline
recall and clDice (docs/metrics.md) inside the FOV, per photograph, then
averaged per dataset (HRF also per category: h healthy, g glaucoma, dr
diabetic retinopathy), with the worst photograph's dice.
"""
import argparse
import os
import platform
import sys
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from train_utils import prediction  # noqa: E402
from held_out import held_out_samples  # noqa: E402
from my_dataset import DATASETS  # noqa: E402
from train_utils.cli import predict_parser, weights_or_default  # noqa: E402
from train_utils.distributed_utils import resolve_device  # noqa: E402
from train_utils.errors import UserError, run_cli  # noqa: E402
from train_utils.imaging import fov_scale, read_label, stem_of  # noqa: E402
from train_utils.inference import RESIZE_SPACES, predicted_classes, probabilities_at  # noqa: E402
from train_utils.skeleton import centreline_counts, cldice  # noqa: E402
from train_utils.transforms import rescale  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", nargs="+", default=["drive"],
                        choices=[d for d in DATASETS if d != "folder" and not DATASETS[d].av])
    parser.add_argument("--data-path", nargs="+", required=True, help="one per --dataset, as train.py reads it")
    parser.add_argument("--weights", nargs="+", default=[None], help="checkpoints to compare (default: the "
                        "shipped model)")
    parser.add_argument("--images", nargs="+", default=None, metavar="STEM",
                        help="score only these photographs (stems); default: the shipped model's held-out ones")
    parser.add_argument("--fov-diameter-max", nargs="+", default=["model"], metavar="PX",
                        help="largest working FOV diameters to try: 'model' (the checkpoint's), 0 (none), or pixels")
    parser.add_argument("--space", nargs="+", default=["probability"], choices=RESIZE_SPACES,
                        help="ways back to the photograph's size to try")
    parser.add_argument("--noise", nargs="+", type=float, default=[0.0], metavar="SD",
                        help="standard deviations of Gaussian noise added to the photographs (0-255 levels)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--per-image", action="store_true", help="print every photograph's scores too")
    return parser


def scores(vessels, label, fov):
    """(dice, sensitivity, specificity, centreline recall, clDice) of the predicted vessels against the label,
    inside the FOV."""
    p, t = vessels[fov], label[fov]
    tp, fp, fn = np.sum(p & t), np.sum(p & ~t), np.sum(~p & t)
    tn = p.size - tp - fp - fn
    cl = cldice(centreline_counts(torch.from_numpy(vessels & fov)[None], torch.from_numpy(label & fov)[None])[0])
    return (2 * tp / max(2 * tp + fp + fn, 1), tp / max(tp + fn, 1), tn / max(tn + fp, 1), cl["cl_recall"],
            cl["cldice"])


def with_noise(image, sd, seed=0):
    """The photograph (uint8 ``[H, W, 3]``) as uint8 ``[3, H, W]`` with seeded Gaussian noise of ``sd`` levels."""
    g = torch.Generator().manual_seed(seed)
    img = torch.from_numpy(image).permute(2, 0, 1).float()
    return (img + sd * torch.randn(img.shape, generator=g)).round_().clamp_(0, 255).to(torch.uint8)


def groups_of(name, stem):
    """The rows a photograph counts in: its dataset, and for HRF its category too."""
    rows = [name]
    if name == "hrf":
        rows.append(f"hrf {stem.split('_')[-1].lower()}")
    return rows


def main(args):
    if len(args.data_path) != len(args.dataset):
        raise UserError(f"{len(args.dataset)} --dataset but {len(args.data_path)} --data-path: give one each")
    device = resolve_device(args.device)
    opts = predict_parser().parse_args(["--img", "-"])  # predict.py's defaults (tiles, batch)
    samples = [(name, s) for name, root in zip(args.dataset, args.data_path)
               for s in held_out_samples(name, root, args.images)]
    table = defaultdict(list)  # (weights, max, space, group) -> [(dice, se, sp, cl_recall, cldice, stem)]
    start = time.perf_counter()
    for weights in args.weights:
        weights = weights_or_default(weights)
        net = prediction.open_network(weights, device, opts)
        opts.tta = bool(net.saved.get("eval_tta", False))
        for high in args.fov_diameter_max:
            high = net.fov_diameter_max if high == "model" else float(high)
            for name, sample in samples:
                stem = stem_of(sample.image)
                photo = prediction.read_photo(sample.image, sample.mask, net.fov_diameter, net.multiple,
                                           net.kwargs["model"], high)
                label = read_label(sample.label, sample.image, photo.image.shape[:2]) == 1
                for sd in args.noise:
                    work = photo.work if not sd else rescale(
                        with_noise(photo.image, sd), fov_scale(photo.fov, net.fov_diameter, high))[0]
                    with torch.inference_mode():
                        out, _ = prediction.run_network(net, [work], opts)
                    for space in args.space:
                        probs = probabilities_at(out, photo.image.shape[:2], space)[0]
                        row = scores((predicted_classes(probs, net.threshold) != 0).cpu().numpy(), label, photo.fov)
                        key = (os.path.basename(weights), f"{high:g}", space, f"{sd:g}")
                        for group in groups_of(name, stem):
                            table[key + (group,)].append(row + (stem,))
                        if args.per_image:
                            print(" ".join(key), f"{name} {stem}: dice {row[0]:.4f} se {row[1]:.4f} "
                                  f"sp {row[2]:.4f} cl_recall {row[3]:.4f} cldice {row[4]:.4f}", flush=True)
    groups = list(dict.fromkeys(k[4] for k in table))
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{time.perf_counter() - start:.0f} s; cells: mean dice (sensitivity, specificity; centreline recall, "
          f"clDice), worst photograph's dice, photographs")
    print("| weights | largest FOV | way back | noise SD | " + " | ".join(groups) + " |")
    print("| --- | --- | --- | --- |" + " --- |" * len(groups))
    for key in dict.fromkeys(k[:4] for k in table):
        cells = []
        for group in groups:
            named = table[key + (group,)]
            rows = np.array([r[:5] for r in named])
            worst = min(named, key=lambda r: r[0])
            cells.append(f"{rows[:, 0].mean():.4f} ({rows[:, 1].mean():.3f}, {rows[:, 2].mean():.3f}; "
                         f"{rows[:, 3].mean():.3f}, {rows[:, 4].mean():.3f}), {worst[5]} {worst[0]:.4f}, {len(rows)}")
        print(f"| {' | '.join(key)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
