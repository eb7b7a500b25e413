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
from train_utils.metrics import ArteryVeinMetrics  # noqa: E402

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


def scores(classes, label, fov):
    """artery F1, vein F1, their mean and A/V accuracy (``ArteryVeinMetrics``) and the vessel dice of a predicted
    class map (0, ``ARTERY``, ``VEIN``) against an artery/vein label, inside the FOV, pooled over the lists'
    photographs."""
    metrics = ArteryVeinMetrics()
    vessel = [0, 0, 0]  # tp, fp, fn
    for c, t, f in zip(classes, label, fov):
        metrics.update_classes(torch.from_numpy(c), torch.from_numpy(np.where(f & (t != AV_UNCERTAIN), t, 255)))
        found, truth = f & (c != 0), f & (t != 0) & (t != 255)
        vessel = [v + n for v, n in zip(vessel, (np.count_nonzero(found & truth), np.count_nonzero(found & ~truth),
                                                 np.count_nonzero(~found & truth)))]
    out = metrics.compute()
    out["mean_f1"] = (out["artery_f1"] + out["vein_f1"]) / 2
    out["vessel_dice"] = 2 * vessel[0] / (2 * vessel[0] + vessel[1] + vessel[2]) if any(vessel) else float("nan")
    return out


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
    stems = set(args.images) if args.images else None
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for weights in args.weights:
        weights = weights_or_default(weights, av=True)
        net, opts = open_av_model(weights, args.device)
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
    maps = {v: [] for v in variants}  # (classes, label, FOV) of each photograph: pooled at the end
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
            maps[threshold].append((classes, label, photo.fov))
            rows[threshold].append((stem_of(sample.image), scores([classes], [label], [photo.fov])))
            if pictures and threshold == variants[0]:
                os.makedirs(pictures, exist_ok=True)
                Image.fromarray(error_picture(photo.image, classes, label, photo.fov)).save(
                    os.path.join(pictures, f"{stem_of(sample.image)}_av_errors.png"))
    print(f"{name}: {seconds / len(samples):.2f} s a photograph")
    out = []
    for variant in variants:
        pooled, worst = scores(*zip(*maps[variant])), min(rows[variant], key=lambda r: r[1]["mean_f1"])
        lines = [f"| {name} | {len(rows[variant])} | {pooled['artery_f1']:.3f} | {pooled['vein_f1']:.3f} | "
                 f"{pooled['mean_f1']:.3f} | {pooled['av_accuracy']:.3f} | {pooled['vessel_dice']:.3f} | "
                 f"{worst[0]} {worst[1]['mean_f1']:.3f} |"]
        lines += [f"|   {stem} | | {s['artery_f1']:.3f} | {s['vein_f1']:.3f} | {s['mean_f1']:.3f} | "
                  f"{s['av_accuracy']:.3f} | {s['vessel_dice']:.3f} | |" for stem, s in rows[variant]]
        out.append((variant, "\n".join(lines)))
    return out


def open_av_model(weights, device):
    """(network, predict.py's settings) of the artery/vein model ``weights`` (a path) on ``device``, opened as
    predict.py --av opens it, its flips averaged as its validation did."""
    opts = prediction_options(device)
    net = prediction.open_network(weights, resolve_device(device), opts)
    prediction.check_model(net, argparse.Namespace(av=True))
    opts.tta = bool(net.saved.get("eval_tta", False))
    return net, opts


def prediction_options(device):
    """predict.py's settings for the functions: whole photographs (tiles of 1024), float32, the model's flips."""
    return argparse.Namespace(device=device, amp=False, amp_dtype=None, channels_last=True, tile_size=1024,
                              tile_overlap=128, batch_size=1, tta=False, threshold=None)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
