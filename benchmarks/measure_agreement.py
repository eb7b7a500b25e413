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
1986). Where the dataset has a second expert's labels (CHASE_DB1's
``_2ndHO.png``, STARE's ``labels-vk``), the same two numbers for the second
expert against the first stand beside the model's: the human yardstick.
A second table scores the masks' pixels and centrelines against the first
expert (dice, centreline recall, clDice; the model's, and the second
expert's), with the worst photograph's dice. ``--output-dir`` also keeps the
tables of rows (predicted.csv, labels.csv, second.csv) and the markdown
tables (agreement.md).
"""
import argparse
import math
import os
import platform
import sys
import time
from typing import NamedTuple, Optional

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
from train_utils.imaging import read_label, stem_of  # noqa: E402
from train_utils.inference import predicted_classes  # noqa: E402
from train_utils.measurements import FEATURES, MeasurementsFile, icc_a1, mean_difference, measure  # noqa: E402
from train_utils.skeleton import centreline_counts, cldice  # noqa: E402

# Where a dataset keeps its second expert's label, from the first expert's path.
SECOND_OBSERVER = {
    "chase_db1": lambda label: label.replace("_1stHO", "_2ndHO"),
    "stare": lambda label: os.path.join(os.path.dirname(os.path.dirname(label)), "labels-vk",
                                        os.path.basename(label).replace(".ah.", ".vk.")),
}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=None)
    parser.add_argument("--dataset", nargs="+", default=["drive"],
                        choices=[d for d in DATASETS if d != "folder" and not DATASETS[d].av])
    parser.add_argument("--data-path", nargs="+", required=True, help="one per --dataset, as train.py reads it")
    parser.add_argument("--images", nargs="+", default=None, metavar="STEM",
                        help="measure only these photographs (stems); default: those the shipped model was not "
                             "trained on")
    parser.add_argument("--weights", default=None, help="default: as predict.py (the shipped model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output-dir", default=None, help="keep predicted.csv, labels.csv and agreement.md here")
    parser.add_argument("--threshold", type=float, default=None,
                        help="vessel where its probability exceeds this (default: the model's own, as predict.py)")
    return parser


def predicted_mask(net, sample, opts):
    """(the photograph, its FOV, the mask predict.py writes for it: the vessel class inside the FOV, bool)."""
    photo = prediction.read_photo(sample.image, sample.mask, net.fov_diameter, net.multiple, net.kwargs["model"],
                               net.fov_diameter_max)
    probs, _ = prediction.predict_photo(net, photo, opts)
    return photo.image, photo.fov, (predicted_classes(probs, opts.threshold) == 1).cpu().numpy() & photo.fov


def pixel_scores(mask, label, fov):
    """{dice, cl_recall, cl_precision, cldice} of ``mask`` against ``label`` inside ``fov``."""
    p, t = mask & fov, label & fov
    dice = 2 * np.sum(p & t) / max(np.sum(p) + np.sum(t), 1)
    counts = centreline_counts(torch.from_numpy(p)[None], torch.from_numpy(t)[None])[0]
    return {"dice": float(dice), **cldice(counts)}


class Measured(NamedTuple):
    """One photograph: the measurement rows of the prediction, the label and the second expert's label (or
    None), and the pixel scores of the prediction and of the second expert against the label."""
    predicted: dict
    label: dict
    second: Optional[dict]
    scores: dict
    second_scores: Optional[dict]


def measure_dataset(name, samples, net, opts):
    """A ``Measured`` per sample."""
    out = []
    for sample in samples:
        t0 = time.perf_counter()
        image, fov, pred = predicted_mask(net, sample, opts)
        label = read_label(sample.label, sample.image, image.shape[:2]) == 1
        stem = stem_of(sample.image)
        second_path = SECOND_OBSERVER[name](sample.label) if name in SECOND_OBSERVER else None
        second = None
        if second_path and os.path.exists(second_path):
            second = read_label(second_path, sample.image, image.shape[:2]) == 1
        out.append(Measured(measure(pred, fov, stem).row, measure(label, fov, stem).row,
                            measure(second, fov, stem).row if second is not None else None,
                            pixel_scores(pred, label, fov),
                            pixel_scores(second, label, fov) if second is not None else None))
        print(f"{name} {stem}: {image.shape[1]}x{image.shape[0]}  {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def _number(v):
    return math.nan if v is None else float(v)


def agreement(rows, labels, feature):
    """(n, label mean, rater mean, ICC(A,1), relative mean difference, its SD) of one feature over photographs."""
    x = np.array([_number(r[feature]) for r in rows])
    y = np.array([_number(lab[feature]) for lab in labels])
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if not len(x):
        return 0, math.nan, math.nan, math.nan, math.nan, math.nan
    diff, sd = mean_difference(x, y)
    return len(x), y.mean(), x.mean(), icc_a1(x, y), diff / y.mean(), sd / y.mean()


def rater_cell(mean, icc, diff, sd):
    """A rater's mean, ICC(A,1) and difference from the first expert (% of its mean, +- SD), as a table cell."""
    return f"{mean:.4g}, {icc:.3f}, {100 * diff:+.1f} +- {100 * sd:.1f}"


def agreement_rows(groups):
    """Markdown rows: feature, dataset, n, label mean, then for the model and for the second expert (where
    there is one) the mean, ICC(A,1) and the mean difference from the label in % of its mean (+- SD)."""
    lines = ["| feature | dataset | n | first expert's mean | model: mean, ICC(A,1), difference % +- SD "
             "| second expert: n, mean, ICC(A,1), difference % +- SD |",
             "| --- | --- | --- | --- | --- | --- |"]
    for feature in FEATURES:
        for group, items in groups.items():
            n, y, x, icc, diff, sd = agreement([m.predicted for m in items], [m.label for m in items], feature)
            seconds = [m for m in items if m.second is not None]
            second = ""
            if seconds:
                n2, _, *rest = agreement([m.second for m in seconds], [m.label for m in seconds], feature)
                second = f"{n2}, {rater_cell(*rest)}"
            lines.append(f"| {feature} | {group} | {n} | {y:.4g} | {rater_cell(x, icc, diff, sd)} | {second} |")
    return lines


SCORES = ("dice", "cl_recall", "cl_precision", "cldice")


def score_rows(groups):
    """Markdown rows: per dataset, the mean of each pixel score of the model (and of the second expert) against
    the first expert, and the worst photograph by dice."""
    lines = ["| dataset | who | n | " + " | ".join(SCORES) + " | worst photograph (dice) |",
             "| --- | --- | --- |" + " --- |" * len(SCORES) + " --- |"]
    for group, items in groups.items():
        for who, get in (("model", lambda m: m.scores), ("second expert", lambda m: m.second_scores)):
            rated = [(m.label["image"], get(m)) for m in items if get(m) is not None]
            if not rated:
                continue
            means = [np.mean([s[k] for _, s in rated]) for k in SCORES]
            worst = min(rated, key=lambda r: r[1]["dice"])
            lines.append(f"| {group} | {who} | {len(rated)} | " + " | ".join(f"{v:.4f}" for v in means)
                         + f" | {worst[0]} ({worst[1]['dice']:.4f}) |")
    return lines


def main(args):
    if len(args.data_path) != len(args.dataset):
        raise UserError(f"{len(args.dataset)} --dataset but {len(args.data_path)} --data-path: give one each")
    weights = weights_or_default(args.weights)
    device = resolve_device(args.device)
    opts = predict_parser().parse_args(["--img", "-"])  # predict.py's defaults (tiles, batch)
    net = prediction.open_network(weights, device, opts)
    opts.tta = bool(net.saved.get("eval_tta", False))
    opts.threshold = net.threshold if args.threshold is None else args.threshold
    groups = {}
    start = time.perf_counter()
    with torch.inference_mode():
        for name, root in zip(args.dataset, args.data_path):
            groups[name] = measure_dataset(name, held_out_samples(name, root, args.images), net, opts)
    if len(groups) > 1:
        groups["pooled"] = [p for pairs in groups.values() for p in pairs]
    lines = agreement_rows(groups) + [""] + score_rows(groups)
    threshold = "the more likely class" if opts.threshold is None else f"probability > {opts.threshold:g}"
    head = (f"weights {os.path.relpath(weights, ROOT)}, flips averaged: {opts.tta}, vessel: {threshold}; "
            f"{platform.processor() or platform.machine()}, torch {torch.__version__}; "
            f"{time.perf_counter() - start:.0f} s")
    print(head)
    print("\n".join(lines))
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        for file_name, which in (("predicted.csv", "predicted"), ("labels.csv", "label"), ("second.csv", "second")):
            table = MeasurementsFile(os.path.join(args.output_dir, file_name))
            for name, items in groups.items():
                for m in items if name != "pooled" else ():
                    row = getattr(m, which)
                    if row is not None:
                        table.add(dict(row, image=f"{name}/{row['image']}"))
            table.merge()
        with open(os.path.join(args.output_dir, "agreement.md"), "w", encoding="utf-8") as f:
            f.write(head + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
