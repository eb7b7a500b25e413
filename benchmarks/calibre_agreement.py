"""Agreement of CRAE, CRVE and AVR from the predicted artery/vein map with those of the experts' labels.

    python benchmarks/calibre_agreement.py --dataset drive_av hrf_av --data-path DRIVE_ROOT HRF_ROOT
    python benchmarks/calibre_agreement.py --dataset drive_av --data-path DRIVE_ROOT --images all

Every photograph (by default those the shipped artery/vein model never
trained on, ``held_out.py``; ``--images all``: every labelled one, the
trained-on ones marked) is predicted as ``predict.py --av`` predicts it (the
same functions), and both its predicted artery/vein map and its label (the
label's uncertain vessels, mostly crossings, counting as neither class, as
``measure.py --av`` reads them) are measured by
``calibre.measure_calibres``, with the disc found in the photograph and the
dataset's FOV mask: the columns ``predict.py --av --measure`` and
``measure.py --av --img`` write. Per dataset it prints the photographs whose
``calibre_qc`` is ``ok`` both ways, ICC(A,1) (two-way random, absolute
agreement, single measure; McGraw & Wong 1996) and the mean difference
predicted - label with its standard deviation (Bland & Altman 1986) of
``crae_fov``, ``crve_fov`` and ``avr`` over the photographs with values both
ways, then each photograph's values, and the seconds ``measure_calibres``
took on a predicted map (median and most, skan's compiling done before).
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

from artery_vein import open_av_model  # noqa: E402
from held_out import TRAINED_ON, held_out_samples  # noqa: E402
from my_dataset import DATASETS  # noqa: E402
from train_utils import prediction  # noqa: E402
from train_utils.calibre import measure_calibres  # noqa: E402
from train_utils.cli import weights_or_default  # noqa: E402
from train_utils.errors import UserError, run_cli  # noqa: E402
from train_utils.imaging import IGNORE_INDEX, fov_diameter, read_av_label, stem_of  # noqa: E402
from train_utils.inference import predicted_classes  # noqa: E402
from train_utils.measurements import icc_a1, mean_difference, warm_up  # noqa: E402

COMPARED = ("crae_fov", "crve_fov", "avr")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", nargs="+", default=["drive_av"],
                        choices=[d for d in DATASETS if DATASETS[d].av])
    parser.add_argument("--data-path", nargs="+", required=True, help="one per --dataset, as train.py reads it")
    parser.add_argument("--weights", default=None, help="the artery/vein model (default: the shipped one)")
    parser.add_argument("--images", nargs="+", default=None, metavar="STEM",
                        help="these photographs (stems), or 'all'; default: the shipped model's held-out ones")
    parser.add_argument("--threshold", type=float, default=None,
                        help="vessel where 1 - P(background) exceeds it (default: the model's own)")
    parser.add_argument("--device", default="cpu")
    return parser


def main(args):
    if len(args.data_path) != len(args.dataset):
        raise UserError("--data-path needs one folder per --dataset")
    weights = weights_or_default(args.weights, av=True)
    net, opts = open_av_model(weights, args.device)
    threshold = net.threshold if args.threshold is None else args.threshold
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; {weights}, threshold {threshold}")
    warm_up().join()  # skan's compiling, once a process (predict.py does it while the model loads): not timed
    for name, root in zip(args.dataset, args.data_path):
        every = args.images == ["all"]
        samples = held_out_samples(name, root, None if every else args.images)
        if every:
            samples = held_out_samples(name, root, {stem_of(s.image) for s in samples} | TRAINED_ON[name])
        pairs, seconds = [], []
        for sample in samples:
            photo = prediction.read_photo(sample.image, sample.mask, net.fov_diameter, net.multiple,
                                          net.kwargs["model"], net.fov_diameter_max)
            probs, _ = prediction.predict_photo(net, photo, opts)
            classes = predicted_classes(probs, threshold).numpy()
            classes[~photo.fov] = 0
            label = read_av_label(sample.label, sample.image, classes.shape)
            label = np.where(label == IGNORE_INDEX, 0, label)
            diameter = fov_diameter(photo.fov)
            t0 = time.perf_counter()
            predicted = measure_calibres(classes, photo.fov, photo.image, diameter=diameter).row
            seconds.append(time.perf_counter() - t0)
            labelled = measure_calibres(label, photo.fov, photo.image, diameter=diameter).row
            stem = stem_of(sample.image)
            pairs.append((stem + (" (trained on)" if stem in TRAINED_ON[name] else ""), predicted, labelled))
        print(table(name, pairs))
        print(f"measure_calibres of a predicted map: median {np.median(seconds):.3f} s, most {max(seconds):.3f} s")


def table(name, pairs):
    """The markdown lines of one dataset: its agreement, then each photograph's values."""
    ok = sum(p["calibre_qc"] == "ok" and lab["calibre_qc"] == "ok" for _, p, lab in pairs)
    lines = [f"\n{name}: {len(pairs)} photographs, calibre_qc ok both ways on {ok}",
             "| value | photographs | label mean | ICC(A,1) | mean difference (SD) |",
             "| --- | --- | --- | --- | --- |"]
    for column in COMPARED:
        both = [(p[column], lab[column]) for _, p, lab in pairs if p[column] is not None and lab[column] is not None]
        if not both:
            continue
        x, y = (np.array(v, dtype=np.float64) for v in zip(*both))
        diff, sd = mean_difference(x, y)
        lines.append(f"| {column} | {len(both)} | {y.mean():.4g} | {icc_a1(x, y):.3f} | {diff:+.3g} ({sd:.2g}) |")
    lines += ["", "| photograph | disc (x, y, diameter) | arterioles, venules | crae_fov | crve_fov | avr | qc |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for stem, p, lab in pairs:
        def pair(column, fmt):
            return " / ".join(format(r[column], fmt) if r[column] is not None else "-" for r in (p, lab))
        disc = (f"{p['disc_x_px']:.0f}, {p['disc_y_px']:.0f}, {p['disc_diameter_px']:.0f}"
                if p["disc_x_px"] is not None else "-")
        lines.append(f"| {stem} | {disc} | {pair('arterioles_measured', 'd')}, {pair('venules_measured', 'd')} | "
                     f"{pair('crae_fov', '.4f')} | {pair('crve_fov', '.4f')} | {pair('avr', '.3f')} | "
                     f"{pair('calibre_qc', 's')} |")
    lines.append("(each cell: predicted / label)")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
