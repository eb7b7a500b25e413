"""Predict vessel masks for fundus photographs with a checkpoint written by ``train.py``.

    python predict.py --img data/synthetic/DRIVE/test/images/01_test.tif    # after train.py --demo
    python predict.py --weights save_weights/best_model.pth --img DRIVE/test/images/01_test.tif \\
        --roi-mask DRIVE/test/mask/01_test_mask.gif --output test_result.png
    python predict.py --img DRIVE/test/images --roi-mask DRIVE/test/mask --output-dir out --save-prob --overlay
    python predict.py --img photo.jpg --tta        # FOV estimated from the dark border
    python predict.py --img big_3500x2300.png --tile-size 512 --tile-overlap 64 --device cpu
    python predict.py --img DRIVE/test/images --roi-mask DRIVE/test/mask --output-dir out --measure --fov-angle 45

Without ``--weights`` it uses ``save_weights/best_model.pth``, else
``save_weights/demo/best_model.pth`` (what ``train.py --demo`` writes), so the
first example writes ``predictions/01_test.png``; on a fresh clone, the
model shipped in ``weights/`` (docs/model_card.md).

For each input ``<stem>.<ext>`` it writes ``<stem>.png`` in ``--output-dir``
(or, for one image, ``--output FILE.png``): 0/255 with 255 where the
predicted class is not the background (with more than one foreground
class: a palette PNG of class indices); ``--save-prob`` adds
``<stem>_prob.png``, the foreground probability 1 - P(background) as 0..255;
``--overlay`` adds ``<stem>_overlay.png``, the vessels drawn over the photograph.
``--measure`` adds the measurements of every mask (docs/measurements.md) to
``measurements.csv`` beside them, one row per photograph, as ``measure.py``
measures masks that exist; with ``--overlay`` the measured skeleton, its
junctions and end points are drawn too.
Pixels outside the field of view are 0 in the mask and the probability map.
The FOV comes from ``--roi-mask`` (a file, or a folder of DRIVE-named masks:
``NN_test_mask.gif`` for ``NN_test.tif``) or, without it, is estimated from
the photograph's dark border.

The model, its class count, its normalisation and its FOV scale
(``--fov-diameter``) come from the checkpoint.
``--weights model.onnx`` (written by ``export.py``) runs the exported model with
onnxruntime on the CPU instead, with the same outputs.
Images larger than ``--tile-size`` are predicted in overlapping tiles blended
with a smooth window, so memory stays bounded whatever the image size.
"""
import os
import time

from train_utils.allocator import use_fast_allocator
from train_utils.cli import MEASUREMENTS_CSV, predict_parser as get_args_parser, weights_or_default

# First, before torch loads: --help and mistyped flags are answered at once (train_utils/cli.py imports no
# torch); then the script runs again with a fast allocator (train_utils/allocator.py).
if __name__ == "__main__":
    cli_args = get_args_parser(doc=__doc__).parse_args()
    use_fast_allocator()

import numpy as np
import torch
from PIL import Image

import src

from train_utils.checkpoint import model_from_checkpoint, normalisation
from train_utils.distributed_utils import resolve_device
from train_utils.errors import UserError, run_cli
from train_utils.files import atomic_write, nearest_existing
from train_utils.imaging import (IMAGE_EXTS, check_min_size, find_mask, fov_scale, image_size, list_inputs,
                                 palette_image, photo_fov, read_image, stem_of)
from train_utils.inference import inference_model, predict_probabilities, probabilities_at
from train_utils.precision import autocast_dtype
from train_utils.transforms import rescale

OVERLAY_ALPHA = 0.6
# Class colours for overlays and palette masks: background black, then green (vessels), red, blue, ...
CLASS_COLOURS = [(0, 0, 0), (0, 255, 0), (255, 0, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
                 (255, 128, 0), (128, 0, 255), (0, 128, 255), (255, 255, 255)]


def check_args(args):
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {args.batch_size})")
    if args.tile_size < 0 or args.tile_overlap < 0:
        raise UserError("--tile-size and --tile-overlap must be >= 0")
    if args.tile_size and args.tile_overlap >= args.tile_size:
        raise UserError(f"--tile-overlap ({args.tile_overlap}) must be smaller than --tile-size ({args.tile_size})")
    if not args.measure and (args.pixel_size is not None or args.fov_angle is not None):
        raise UserError("--pixel-size and --fov-angle set the units of the measurements: add --measure")


# ---------------------------------------------------------------------------
# inputs and outputs


def output_paths(args, inputs, mask_files):
    """For each input, its (mask, prob, overlay) output paths; refuses names that clash or hit an input.

    ``--output`` names one image's mask file, or, as in earlier versions, a folder (an existing folder or a
    name without an image suffix), which then replaces ``--output-dir``.
    """
    out = args.output or args.output_dir
    file_mode = args.output is not None and not os.path.isdir(out) and out.lower().endswith(IMAGE_EXTS)
    if file_mode and not out.lower().endswith(".png"):
        raise UserError(f"--output '{out}': masks are written as PNG; give a .png file name, or a folder with "
                        "--output-dir")
    if file_mode and len(inputs) > 1:
        raise UserError(f"--output '{out}' is a file name but '{args.img}' holds {len(inputs)} images; "
                        "give a folder with --output-dir")
    blocker = nearest_existing(os.path.dirname(os.path.abspath(out)) if file_mode else out)
    if not os.path.isdir(blocker):
        raise UserError(f"{'--output' if args.output else '--output-dir'} '{out}': '{blocker}' is a file, not a "
                        "folder; name a folder (or, for one image, a .png file)")
    plans = []
    for path in inputs:
        base = os.path.splitext(out)[0] if file_mode else os.path.join(out, stem_of(path))
        plans.append((base + ".png" if not file_mode else out, base + "_prob.png", base + "_overlay.png"))
    written = [p for plan in plans for p, on in zip(plan, (True, args.save_prob, args.overlay)) if on]
    real = [os.path.realpath(p) for p in written]
    if len(set(real)) != len(real):
        dup = next(p for p, r in zip(written, real) if real.count(r) > 1)
        raise UserError(f"two inputs would write the same output '{dup}' (images with the same name stem?)")
    protected = {os.path.realpath(p) for p in inputs}
    protected |= {os.path.realpath(m) for m in mask_files if m}
    for p, r in zip(written, real):
        if r in protected:
            raise UserError(f"output '{p}' would overwrite an input file; choose another --output-dir or --output")
    return plans



def measurements_table(args, plans, inputs):
    """With ``--measure``: the ``measurements.csv`` beside the masks (``MeasurementsFile``), checked before any
    work (the optional packages installed, an existing file's columns), and the skeleton library warmed up."""
    if not args.measure:
        return None
    from train_utils.measurements import MeasurementsFile, check_available, check_flags, warm_up
    check_flags(args.pixel_size, args.fov_angle, args.measure_diameter)
    check_available()
    path = os.path.join(os.path.dirname(plans[0][0]), MEASUREMENTS_CSV)
    if os.path.realpath(path) in {os.path.realpath(p) for p in inputs}:
        raise UserError(f"output '{path}' would overwrite an input file; choose another --output-dir")
    table = MeasurementsFile(path)
    warm_up()
    return table


def colour_overlay(image, classes):
    """The photograph with every foreground class blended in its colour."""
    out = image.astype(np.float32)
    for c in range(1, int(classes.max()) + 1):
        sel = classes == c
        colour = np.array(CLASS_COLOURS[c] if c < len(CLASS_COLOURS) else (255, 255, 255), dtype=np.float32)
        out[sel] = (1 - OVERLAY_ALPHA) * out[sel] + OVERLAY_ALPHA * colour
    return np.rint(out).clip(0, 255).astype(np.uint8)


def save_outputs(probs, image, fov, plan, args, table=None, name=""):
    """Write the mask (and prob / overlay) of one image from its class probabilities [C, H, W]; with a
    ``table`` (``--measure``), measure the vessel class (1) into its row ``name``, drawn on the overlay.
    Returns the seconds the measuring took (0 without)."""
    mask_path, prob_path, overlay_path = plan
    folder = os.path.dirname(mask_path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fov_t = torch.from_numpy(fov).to(probs.device)
    classes = torch.where(fov_t, probs.argmax(dim=0), 0).to(torch.uint8).cpu().numpy()
    num_classes = probs.shape[0]
    if num_classes <= 2:
        save_png(Image.fromarray((classes > 0).astype(np.uint8) * 255), mask_path)
    else:
        save_png(palette_image(classes, CLASS_COLOURS), mask_path)
    if args.save_prob:
        fg = torch.where(fov_t, 1 - probs[0], 0).clamp_(0, 1)
        save_png(Image.fromarray(fg.mul_(255).round_().to(torch.uint8).cpu().numpy()), prob_path)
    measured, seconds = None, 0.0
    if table is not None:
        from train_utils.measurements import measure
        t0 = time.perf_counter()
        measured = measure(classes == 1, fov, name, args.pixel_size, args.fov_angle, args.measure_diameter)
        seconds = time.perf_counter() - t0
    if args.overlay:
        overlay = colour_overlay(image, classes)
        if measured is not None:
            from train_utils.measurements import draw_measurement
            overlay = draw_measurement(overlay, measured)
        save_png(Image.fromarray(overlay), overlay_path)
    if measured is not None:
        table.add(measured.row)
    return seconds


def save_png(image, path):
    """``image`` as the PNG ``path``, whole or not at all (a full disk is one error line)."""
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


# ---------------------------------------------------------------------------
# model


def load_model(weights, device, channels_last=True):
    """The model of a train.py checkpoint, ready for inference, the checkpoint's ``args`` dict and model kwargs."""
    model, ckpt, kwargs = model_from_checkpoint(weights, "predict.py reads RGB photographs")
    return inference_model(model.to(device), channels_last), ckpt.get("args", {}), kwargs


def batches_of_same_size(inputs, sizes, batch_size):
    """Consecutive runs of at most ``batch_size`` inputs with the same size (indices)."""
    group = []
    for i in range(len(inputs)):
        if group and (len(group) == batch_size or sizes[i] != sizes[group[0]]):
            yield group
            group = []
        group.append(i)
    if group:
        yield group


def predict_group(model, images, fovs, fov_diameter, args, **kw):
    """(class probabilities [C, H, W] of each photograph, tiles per image).

    A model trained with ``--fov-diameter`` sees each photograph resized so
    that its FOV is that many pixels across, as in training; its probabilities
    are resized back to the photograph's own size. Without, the photographs go
    in as they are, in one batch.
    """
    opts = dict(tile_size=args.tile_size, tile_overlap=args.tile_overlap, batch_size=args.batch_size,
                tta=args.tta, channels_last=args.channels_last, **kw)
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    if not fov_diameter:
        return predict_probabilities(model, batch, **opts)
    probs = []
    for img, (fov, _) in zip(batch, fovs):
        small, _ = rescale(img, fov_scale(fov, fov_diameter))
        p, tiles = predict_probabilities(model, small[None], **opts)
        probs.append(probabilities_at(p, img.shape[-2:])[0])
    return probs, tiles


def main(args):
    check_args(args)
    inputs = list_inputs(args.img)
    sizes = [image_size(p) for p in inputs]  # every input readable before any work starts
    mask_files = [find_mask(args.roi_mask, p) for p in inputs]
    plans = output_paths(args, inputs, mask_files)
    table = measurements_table(args, plans, inputs)
    weights = weights_or_default(args.weights)
    if weights.lower().endswith(".onnx"):  # exported by export.py: onnxruntime on the CPU, no PyTorch model
        from train_utils.onnx_runtime import load_onnx_model
        model, saved, kwargs, device = load_onnx_model(weights, args.device, args.amp)
    else:
        device = resolve_device(args.device)
        model, saved, kwargs = load_model(weights, device, args.channels_last)
    check_min_size(inputs, src.model_spec(kwargs["model"]).size_multiple, kwargs["model"], sizes)
    if args.tta is None:  # a recipe that validated with flip averaging is meant to be used with it
        args.tta = bool(saved.get("eval_tta", False))
    mean, std = normalisation(saved)
    amp_dtype = autocast_dtype(device, args.amp, args.amp_dtype)
    print(f"using {device.type} device; model {src.describe(**kwargs)} from '{weights}'")
    if args.roi_mask is None:
        print("no --roi-mask given: the field of view is estimated from each image's dark border")

    # A whole image per forward when it fits in one tile (then --batch-size counts images), else tiles.
    start = time.perf_counter()
    for group in batches_of_same_size(inputs, sizes, args.batch_size):
        t0 = time.perf_counter()
        images = [read_image(inputs[i], "RGB") for i in group]
        fovs = [photo_fov(images[k], mask_files[i], inputs[i]) for k, i in enumerate(group)]
        probs, tiles = predict_group(model, images, fovs, saved.get("fov_diameter") or 0, args,
                                     mean=mean, std=std, multiple=src.model_spec(kwargs["model"]).size_multiple,
                                     amp_dtype=amp_dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        shared = (time.perf_counter() - t0) / len(group)  # reading and predicting, shared by the batch
        for k, i in enumerate(group):
            t1 = time.perf_counter()
            h, w = images[k].shape[:2]
            measuring = save_outputs(probs[k], images[k], fovs[k][0], plans[i], args, table, stem_of(inputs[i]))
            elapsed = shared + time.perf_counter() - t1
            print(f"{inputs[i]}: {w}x{h}" + (f", {tiles} tiles" if tiles > 1 else "") + fovs[k][1]
                  + f" -> {plans[i][0]}  {elapsed:.2f} s" + (f" (measured in {measuring:.2f} s)" if table else ""),
                  flush=True)
        del probs
    n = len(inputs)
    print(f"predicted {n} image{'s' * (n != 1)} in {time.perf_counter() - start:.1f} s")
    if table is not None:
        print(f"measurements of {n} image{'s' * (n != 1)}: {table.path}")


if __name__ == "__main__":
    run_cli(main, cli_args, debug=cli_args.debug)
