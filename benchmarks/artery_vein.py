"""Artery/vein scores of artery/vein models on held-out photographs: the numbers of the shipped artery/vein
model's card (docs/model_card.md), and the comparison of its design choices.

    python benchmarks/artery_vein.py --dataset drive_av hrf_av --data-path DRIVE_ROOT HRF_ROOT \\
        --weights weights/unet_av.pth --threshold model 0.5 --pictures av_pictures

Every photograph is predicted as ``predict.py --av`` predicts it (the same
functions of ``train_utils/prediction.py``: its FOV from the dataset's mask,
brought to the model's working scale, flips averaged as the checkpoint's
validation did, back at the photograph's size): a vessel where
1 - P(background) exceeds the threshold (``model``: the model's own), of the
more likely class of artery and vein. Inside the FOV, the label's uncertain
vessels left out: the artery F1 and the vein F1 over all pixels, and the A/V
accuracy on the pixels the label calls artery or vein and the prediction a
vessel; the vessel dice is the vessel class against the whole vessel label
(uncertain vessels included, as the vessel label has them). Each dataset's
pixels are pooled; the worst photograph (the lowest mean of artery and vein
F1) is named. The network runs once a photograph for all thresholds.
``--pictures DIR`` writes, at the first threshold, per photograph, where the
classes are right (artery red, vein blue), swapped (yellow), missed (white)
and found where the label has no vessel (magenta), over the dimmed
photograph.
"""
import argparse
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from held_out import held_out_samples  # noqa: E402
from my_dataset import DATASETS  # noqa: E402
from train_utils import prediction  # noqa: E402
from train_utils.cli import weights_or_default  # noqa: E402
from train_utils.distributed_utils import resolve_device  # noqa: E402
from train_utils.errors import UserError, run_cli  # noqa: E402
from train_utils.imaging import ARTERY, AV_UNCERTAIN, VEIN, read_av_label, stem_of  # noqa: E402
from train_utils.inference import predicted_classes  # noqa: E402

# The counts of one photograph: artery tp, fp, fn; vein tp, fp, fn; A/V right, scored; vessel tp, fp, fn.
COUNTS = 11


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", nargs="+", default=["drive_av"],
                        choices=[d for d in DATASETS if DATASETS[d].av])
    parser.add_argument("--data-path", nargs="+", required=True, help="one per --dataset, as train.py reads it")
    parser.add_argument("--weights", nargs="+", default=[None], help="artery/vein models to compare (default: the "
                        "shipped one)")
    parser.add_argument("--threshold", nargs="+", default=["model"],
                        help="vessel where 1 - P(background) exceeds it; 'model': the model's own")
    parser.add_argument("--images", nargs="+", default=None, metavar="STEM",
                        help="score only these photographs (stems); default: the shipped model's held-out ones")
    parser.add_argument("--pictures", default=None, metavar="DIR", help="write each photograph's errors here")
    parser.add_argument("--device", default="cpu")
    return parser


def counts_of(classes, label, fov):
    """The ``COUNTS`` of a predicted class map (0, ``ARTERY``, ``VEIN``) against an artery/vein label, in the FOV."""
    known = fov & (label != AV_UNCERTAIN) & (label != 255)
    out = []
    for cls in (ARTERY, VEIN):
        p, t = known & (classes == cls), known & (label == cls)
        out += [np.count_nonzero(p & t), np.count_nonzero(p & ~t), np.count_nonzero(~p & t)]
    scored = known & (label != 0) & (classes != 0)
    out += [np.count_nonzero(scored & (classes == label)), np.count_nonzero(scored)]
    vessel, truth = fov & (classes != 0), fov & (label != 0) & (label != 255)
    out += [np.count_nonzero(vessel & truth), np.count_nonzero(vessel & ~truth), np.count_nonzero(~vessel & truth)]
    return np.array(out, dtype=np.int64)


def scores(c):
    """artery F1, vein F1, their mean, A/V accuracy, vessel dice of summed ``COUNTS``."""
    def f1(tp, fp, fn):
        return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    artery, vein = f1(*c[0:3]), f1(*c[3:6])
    return {"artery_f1": artery, "vein_f1": vein, "mean_f1": (artery + vein) / 2,
            "av_accuracy": c[6] / c[7] if c[7] else float("nan"), "vessel_dice": f1(*c[8:11])}


def error_picture(image, classes, label, fov):
    """The dimmed photograph with right arteries red, right veins blue, swapped yellow, missed white, found where
    the label has no vessel magenta (uncertain label vessels left dim)."""
    out = (image.astype(np.float32) * 0.45).astype(np.uint8)
    known = fov & (label != AV_UNCERTAIN)
    found, labelled = classes != 0, (label == ARTERY) | (label == VEIN)
    out[known & found & labelled & (classes == label) & (label == ARTERY)] = (255, 0, 0)
    out[known & found & labelled & (classes == label) & (label == VEIN)] = (0, 90, 255)
    out[known & found & labelled & (classes != label)] = (255, 230, 0)
    out[known & ~found & labelled] = (255, 255, 255)
    out[known & found & (label == 0)] = (255, 0, 255)
    return out


def main(args):
    if len(args.data_path) != len(args.dataset):
        raise UserError("--data-path needs one folder per --dataset")
    device = resolve_device(args.device)
    opts = prediction_options(args.device)
    stems = set(args.images) if args.images else None
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for weights in args.weights:
        weights = weights_or_default(weights, av=True)
        net = prediction.open_network(weights, device, opts)
        prediction.check_model(net, argparse.Namespace(av=True))
        opts.tta = bool(net.saved.get("eval_tta", False))
        variants = [net.threshold if t == "model" else float(t) for t in args.threshold]
        tables = {v: [] for v in variants}
        for name, root in zip(args.dataset, args.data_path):
            for variant, line in score_dataset(net, opts, name, root, stems, args.pictures, variants):
                tables[variant].append(line)
        for threshold, lines in tables.items():
            print(f"\n{weights}: threshold {threshold}, flips {'averaged' if opts.tta else 'not averaged'}")
            print("| dataset | photographs | artery F1 | vein F1 | mean | A/V accuracy | vessel dice | worst "
                  "photograph (mean F1) |")
            print("| --- | --- | --- | --- | --- | --- | --- | --- |")
            print("\n".join(lines))


def score_dataset(net, opts, name, root, stems, pictures, variants):
    """[(threshold, the table's lines)] of one dataset: the network runs once a photograph."""
    samples = held_out_samples(name, root, stems)
    totals = {v: np.zeros(COUNTS, np.int64) for v in variants}
    rows = {v: [] for v in variants}
    seconds = 0.0
    for sample in samples:
        t0 = time.perf_counter()
        photo = prediction.read_photo(sample.image, sample.mask, net.fov_diameter, net.multiple,
                                      net.kwargs["model"], net.fov_diameter_max)
        probs, _ = prediction.predict_photo(net, photo, opts)
        seconds += time.perf_counter() - t0
        label = read_av_label(sample.label, sample.image, probs.shape[1:])
        for threshold in variants:
            classes = predicted_classes(probs, threshold).numpy()
            counts = counts_of(classes, label, photo.fov)
            totals[threshold] += counts
            rows[threshold].append((stem_of(sample.image), scores(counts)))
            if pictures and threshold == variants[0]:
                os.makedirs(pictures, exist_ok=True)
                Image.fromarray(error_picture(photo.image, classes, label, photo.fov)).save(
                    os.path.join(pictures, f"{stem_of(sample.image)}_av_errors.png"))
    print(f"{name}: {seconds / len(samples):.2f} s a photograph")
    out = []
    for variant in variants:
        pooled, worst = scores(totals[variant]), min(rows[variant], key=lambda r: r[1]["mean_f1"])
        lines = [f"| {name} | {len(rows[variant])} | {pooled['artery_f1']:.3f} | {pooled['vein_f1']:.3f} | "
                 f"{pooled['mean_f1']:.3f} | {pooled['av_accuracy']:.3f} | {pooled['vessel_dice']:.3f} | "
                 f"{worst[0]} {worst[1]['mean_f1']:.3f} |"]
        lines += [f"|   {stem} | | {s['artery_f1']:.3f} | {s['vein_f1']:.3f} | {s['mean_f1']:.3f} | "
                  f"{s['av_accuracy']:.3f} | {s['vessel_dice']:.3f} | |" for stem, s in rows[variant]]
        out.append((variant, "\n".join(lines)))
    return out


def prediction_options(device):
    """predict.py's settings for the functions: whole photographs (tiles of 1024), float32, the model's flips."""
    return argparse.Namespace(device=device, amp=False, amp_dtype=None, channels_last=True, tile_size=1024,
                              tile_overlap=128, batch_size=1, tta=False, threshold=None)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
