"""Agreement between the measurements of predicted masks and of the experts' labels, per feature and dataset.

    python benchmarks/measure_agreement.py --dataset drive --data-path DRIVE_ROOT
    python benchmarks/measure_agreement.py --dataset drive chase_db1 stare hrf \\
        --data-path DRIVE_ROOT CHASEDB1 STARE HRF --output-dir agreement

Each photograph of the datasets that the model was not trained on (by
default those the shipped model never trained on, ``held_out.py``: all but
DRIVE's 21-35, CHASE_DB1's 01-10 other than 03R 05R 06R 08L, STARE's first
ten labelled other than im0003 im0005 im0044 im0081, and HRF's 02-05 of each
category) is predicted as
``predict.py`` predicts it (the same functions, flips as the checkpoint
says), and both its predicted mask and its label are measured inside the
same field of view (the dataset's FOV mask, else estimated from the
photograph, as predict.py does) by ``train_utils.measurements.measure``,
the code of ``predict.py --measure`` and ``measure.py``.

For every feature it prints, per dataset and pooled over all, the number of
photographs, the mean of the label's values, ICC(A,1) (two-way random,
absolute agreement, single measure; McGraw & Wong 1996) and the mean
difference predicted - label with its standard deviation (Bland & Altman
1986). ``--output-dir`` also keeps both tables of rows (predicted.csv,
labels.csv) and the markdown table (agreement.md).
"""
import argparse
import math
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

import predict  # noqa: E402
from held_out import held_out_samples  # noqa: E402
from my_dataset import DATASETS  # noqa: E402
from train_utils.cli import weights_or_default  # noqa: E402
from train_utils.distributed_utils import resolve_device  # noqa: E402
from train_utils.errors import UserError, run_cli  # noqa: E402
from train_utils.imaging import read_label, stem_of  # noqa: E402
from train_utils.measurements import FEATURES, MeasurementsFile, icc_a1, mean_difference, measure  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=None)
    parser.add_argument("--dataset", nargs="+", default=["drive"], choices=[d for d in DATASETS if d != "folder"])
    parser.add_argument("--data-path", nargs="+", required=True, help="one per --dataset, as train.py reads it")
    parser.add_argument("--images", nargs="+", default=None, metavar="STEM",
                        help="measure only these photographs (stems); default: those the shipped model was not "
                             "trained on")
    parser.add_argument("--weights", default=None, help="default: as predict.py (the shipped model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output-dir", default=None, help="keep predicted.csv, labels.csv and agreement.md here")
    return parser


def predicted_mask(net, sample, opts):
    """(the photograph, its FOV, the mask predict.py writes for it: the vessel class inside the FOV, bool)."""
    photo = predict.read_photo(sample.image, sample.mask, net.fov_diameter, net.multiple, net.kwargs["model"],
                               net.fov_diameter_max)
    probs, _ = predict.predict_photo(net, photo, opts)
    return photo.image, photo.fov, (probs.argmax(dim=0).cpu().numpy() == 1) & photo.fov


def measure_dataset(name, samples, net, opts):
    """[(predicted row, label row)] of every sample."""
    pairs = []
    for sample in samples:
        t0 = time.perf_counter()
        image, fov, pred = predicted_mask(net, sample, opts)
        label = read_label(sample.label, sample.image, image.shape[:2]) == 1
        stem = stem_of(sample.image)
        pairs.append((measure(pred, fov, stem).row, measure(label, fov, stem).row))
        print(f"{name} {stem}: {image.shape[1]}x{image.shape[0]}  {time.perf_counter() - t0:.1f} s", flush=True)
    return pairs


def _number(v):
    return math.nan if v is None else float(v)


def agreement_rows(groups):
    """Markdown rows: feature, dataset, n, label mean, ICC(A,1), mean difference +- SD."""
    lines = ["| feature | dataset | n | label mean | predicted mean | ICC(A,1) | difference (pred - label), mean +- SD |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for feature in FEATURES:
        for group, pairs in groups.items():
            x = np.array([_number(p[feature]) for p, _ in pairs])
            y = np.array([_number(lab[feature]) for _, lab in pairs])
            ok = np.isfinite(x) & np.isfinite(y)
            x, y = x[ok], y[ok]
            icc = icc_a1(x, y)
            diff, sd = mean_difference(x, y) if len(x) else (math.nan, math.nan)
            lines.append(f"| {feature} | {group} | {len(x)} | {y.mean():.4g} | {x.mean():.4g} | {icc:.3f} | "
                         f"{diff:+.3g} +- {sd:.3g} |")
    return lines


def main(args):
    if len(args.data_path) != len(args.dataset):
        raise UserError(f"{len(args.dataset)} --dataset but {len(args.data_path)} --data-path: give one each")
    weights = weights_or_default(args.weights)
    device = resolve_device(args.device)
    opts = predict.get_args_parser().parse_args(["--img", "-"])  # predict.py's defaults (tiles, batch)
    net = predict.open_network(weights, device, opts)
    opts.tta = bool(net.saved.get("eval_tta", False))
    groups = {}
    start = time.perf_counter()
    with torch.inference_mode():
        for name, root in zip(args.dataset, args.data_path):
            groups[name] = measure_dataset(name, held_out_samples(name, root, args.images), net, opts)
    if len(groups) > 1:
        groups["pooled"] = [p for pairs in groups.values() for p in pairs]
    lines = agreement_rows(groups)
    head = (f"weights {os.path.relpath(weights, ROOT)}, flips averaged: {opts.tta}; {platform.processor() or platform.machine()}, "
            f"torch {torch.__version__}; {time.perf_counter() - start:.0f} s")
    print(head)
    print("\n".join(lines))
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        for file_name, which in (("predicted.csv", 0), ("labels.csv", 1)):
            table = MeasurementsFile(os.path.join(args.output_dir, file_name))
            for name, pairs in groups.items():
                if name != "pooled":
                    for pair in pairs:
                        table.add(dict(pair[which], image=f"{name}/{pair[which]['image']}"))
            table.merge()
        with open(os.path.join(args.output_dir, "agreement.md"), "w", encoding="utf-8") as f:
            f.write(head + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
