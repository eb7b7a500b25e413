"""Measure vessel masks that already exist: predict.py's, another tool's, or manual labels.

    python measure.py --masks predictions --roi-mask DRIVE/test/mask --output-dir measured
    python measure.py --masks DRIVE/test/1st_manual --roi-mask DRIVE/test/mask --fov-angle 45 --overlay
    python measure.py --masks CHASEDB1 --img CHASEDB1 --output-dir chase   # FOV estimated from the photographs

For each mask (0/255 or 0/1; a folder's ``<stem>_prob.*`` and
``<stem>_overlay.*`` files are skipped) it writes one row of
``measurements.csv`` in ``--output-dir``: the same columns, from the same
code, as ``predict.py --measure`` (docs/measurements.md). The field of view
is ``--roi-mask``, else estimated from the photograph ``--img`` as predict.py
estimates it, else the whole image (said so). ``--overlay`` writes
``<stem>_overlay.png``: the skeleton, junctions and end points over the
photograph (or over the mask in grey). Needs no PyTorch and no model; needs
scikit-image and skan (``pip install -r requirements-extras.txt``).

With ``--av`` the masks are artery/vein maps (``predict.py --av``'s
``<stem>_av.png``) or labels, and the row adds the arteries' and the veins'
measurements (``artery_`` and ``vein_`` columns), the optic disc and the
calibres CRAE, CRVE and AVR; with ``--img`` the disc and the vessels'
widths are read in the photograph, as predict.py reads them::

    python measure.py --av --masks predictions --img DRIVE/test/images --roi-mask DRIVE/test/mask --output-dir measured
"""
import os
import time

from train_utils.cli import MEASUREMENTS_CSV, measure_parser as get_args_parser
from train_utils.errors import UserError, run_cli

if __name__ == "__main__":
    cli_args = get_args_parser(doc=__doc__).parse_args()

import numpy as np
from PIL import Image

from train_utils.files import atomic_write, ensure_writable_folder
from train_utils.imaging import (IGNORE_INDEX, estimate_fov, find_companion, image_size, list_inputs, read_av_label,
                                 read_binary, read_image, read_label, stem_of)
from train_utils.measurements import (MeasurementsFile, check_available, check_flags, draw_measurement, measure,
                                      measure_av)

# predict.py's other outputs, beside its masks: not masks themselves.
SKIPPED_SUFFIXES = ("_prob", "_overlay")
AV_SUFFIX = "_av"  # predict.py --av's artery/vein maps
MASK_GREY = 90  # the vessels' grey in an overlay drawn without the photograph
AV_GREYS = np.array([0, 110, 70, 90], dtype=np.uint8)  # an artery/vein map drawn without the photograph


def list_masks(path, av=False):
    """The mask files of ``path`` (a file or a folder), without predict.py's ``_prob``/``_overlay`` files; with
    ``av``, a folder's ``<stem>_av.*`` maps when it holds any (predict.py --av writes them beside masks)."""
    files = list_inputs(path)
    if os.path.isdir(path):
        files = [f for f in files if not stem_of(f).endswith(SKIPPED_SUFFIXES)]
        if av and any(stem_of(f).endswith(AV_SUFFIX) for f in files):
            files = [f for f in files if stem_of(f).endswith(AV_SUFFIX)]
        if not files:
            raise UserError(f"folder '{path}' holds only probability maps and overlays, no masks")
    return files


def row_name(path, av=False):
    """The row's ``image``: the mask's stem, an artery/vein map's without ``_av``."""
    stem = stem_of(path)
    return stem[:-len(AV_SUFFIX)] if av and stem.endswith(AV_SUFFIX) else stem


def plan(args):
    """(mask, FOV mask or None, photograph or None, overlay path) for every mask, every file found before any
    is measured; outputs that would overwrite an input are refused."""
    masks = list_masks(args.masks, args.av)
    plans = []
    for path in masks:
        roi = find_companion(args.roi_mask, path, "--roi-mask") if args.roi_mask else None
        photo = find_companion(args.img, path, "--img") if args.img else None
        plans.append((path, roi, photo, os.path.join(args.output_dir, row_name(path, args.av) + "_overlay.png")))
    stems = [row_name(p[0], args.av) for p in plans]
    if len(set(stems)) != len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise UserError(f"two masks have the stem '{dup}': their rows (and overlays) would share one name")
    inputs = {os.path.realpath(f) for p in plans for f in p[:3] if f}
    outputs = [os.path.join(args.output_dir, MEASUREMENTS_CSV)] + [p[3] for p in plans if args.overlay]
    for out in outputs:
        if os.path.realpath(out) in inputs:
            raise UserError(f"output '{out}' would overwrite an input file; choose another --output-dir")
    return plans


def read_mask(path):
    """A vessel mask file as bool [H, W]: the label rules of training (0/255 with grey edges, or 0/1)."""
    w, h = image_size(path)
    return read_label(path, path, (h, w)) == 1


def field_of_view(vessels, roi, photo, path):
    """(FOV bool [H, W], photograph or None, a note): the FOV mask, else estimated from the photograph, else
    every pixel."""
    image = None
    if photo:
        image = read_image(photo, "RGB")
        if image.shape[:2] != vessels.shape:
            raise UserError(f"photograph '{photo}' is {image.shape[1]}x{image.shape[0]} but its mask '{path}' is "
                            f"{vessels.shape[1]}x{vessels.shape[0]} (width x height)")
    if roi:
        return read_binary(roi, path, vessels.shape), image, ""
    if image is not None:
        fov, threshold = estimate_fov(image)
        return fov, image, f", FOV estimated from the photograph ({fov.mean():.0%} of it)"
    return np.ones(vessels.shape, dtype=bool), None, ", no --roi-mask or --img: the whole image is the FOV"


def read_av_map(path):
    """An artery/vein map or label file as uint8 [H, W] classes (0 background, 1 artery, 2 vein, 3 uncertain)."""
    w, h = image_size(path)
    classes = read_av_label(path, path, (h, w))
    return np.where(classes == IGNORE_INDEX, 0, classes)


def overlay_picture(vessels, image, classes=None):
    """The picture the skeleton is drawn on: the photograph, else the mask in grey on black (an artery/vein
    map's arteries lighter than its veins)."""
    if image is not None:
        return image
    grey = AV_GREYS[np.minimum(classes, 3)] * vessels if classes is not None else (vessels * MASK_GREY)
    return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)


def main(args):
    check_flags(args.pixel_size, args.fov_angle, args.measure_diameter)
    check_available()
    plans = plan(args)
    ensure_writable_folder(args.output_dir, f"--output-dir '{args.output_dir}'")
    table = MeasurementsFile(os.path.join(args.output_dir, MEASUREMENTS_CSV), av=args.av)
    start = time.perf_counter()
    for path, roi, photo, overlay_path in plans:
        t0 = time.perf_counter()
        classes = read_av_map(path) if args.av else None
        vessels = classes != 0 if args.av else read_mask(path)
        fov, image, note = field_of_view(vessels, roi, photo, path)
        units = (args.pixel_size, args.fov_angle, args.measure_diameter)
        measured = (measure_av(classes, fov, row_name(path, True), *units, image=image) if args.av
                    else measure(vessels, fov, stem_of(path), *units))
        if args.overlay:
            picture = draw_measurement(overlay_picture(vessels & fov, image, classes), measured)
            atomic_write(overlay_path, lambda tmp: Image.fromarray(picture).save(tmp, format="PNG"), suffix=".png")
        table.add(measured.row)
        print(f"{path}{note}: {measured.row['segments']} segments, vessel density "
              f"{measured.row['vessel_area_density']:.3f}  {time.perf_counter() - t0:.2f} s", flush=True)
    table.merge()  # a mask measured again replaces its earlier row
    n = len(plans)
    print(f"measured {n} mask{'s' * (n != 1)} in {time.perf_counter() - start:.1f} s: {table.path}")


if __name__ == "__main__":
    run_cli(main, cli_args, debug=cli_args.debug)
