"""Predict vessel masks for fundus photographs with a checkpoint written by ``train.py``.

    python predict.py --img data/synthetic/DRIVE/test/images/01_test.tif    # after train.py --demo
    python predict.py --weights save_weights/best_model.pth --img DRIVE/test/images/01_test.tif \\
        --roi-mask DRIVE/test/mask/01_test_mask.gif --output test_result.png
    python predict.py --img DRIVE/test/images --roi-mask DRIVE/test/mask --output-dir out --save-prob --overlay
    python predict.py --img photo.jpg --tta        # FOV estimated from the dark border
    python predict.py --img big_3500x2300.png --tile-size 512 --tile-overlap 64 --device cpu
    python predict.py --img DRIVE/test/images --roi-mask DRIVE/test/mask --output-dir out --measure --fov-angle 45
    python predict.py --av --img photo.jpg --output-dir out --overlay    # arteries red, veins blue

Without ``--weights`` it uses ``save_weights/best_model.pth``, else
``save_weights/demo/best_model.pth`` (what ``train.py --demo`` writes), so the
first example writes ``predictions/01_test.png``; on a fresh clone, the
model shipped in ``weights/`` (docs/model_card.md).

For each input ``<stem>.<ext>`` it writes ``<stem>.png`` in ``--output-dir``
(or, for one image, ``--output FILE.png``): 0/255 with 255 where the
predicted class is not the background (with more than one foreground
class: a palette PNG of class indices), the more likely class or, with a
decision threshold (``--threshold``, or the model's own), a vessel where
its probability exceeds it; ``--save-prob`` adds
``<stem>_prob.png``, the foreground probability 1 - P(background) as 0..255;
``--overlay`` adds ``<stem>_overlay.png``, the vessels drawn over the photograph.
``--av`` runs an artery/vein model (by default the shipped ``weights/unet_av.pth``) and adds
``<stem>_av.png``, each pixel's class (0 background, 1 artery, 2 vein) as a palette PNG, red arteries and blue
veins in the overlay, their probabilities with ``--save-prob`` and their measurements with ``--measure``
(docs/arteries_veins.md).
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
onnxruntime on the CPU instead, with the same outputs. The steps are
``train_utils/prediction.py``'s, which app.py and the benchmarks share.
Images larger than ``--tile-size`` are predicted in overlapping tiles blended
with a smooth window, so memory stays bounded whatever the image size.
"""
import os
import time

from train_utils.allocator import use_fast_allocator
from train_utils.cli import predict_parser as get_args_parser, weights_or_default

# First, before torch loads: --help and mistyped flags are answered at once (train_utils/cli.py imports no
# torch); then the script runs again with a fast allocator (train_utils/allocator.py).
if __name__ == "__main__":
    cli_args = get_args_parser(doc=__doc__).parse_args()
    use_fast_allocator()

import src

from train_utils import distributed_utils as dist_utils
from train_utils.cohort import attempt, file_digest
from train_utils.errors import run_cli
from train_utils.imaging import files_by_stem, find_mask, list_inputs
from train_utils.prediction import (PhotoRun, check_args, check_model, measurements_table, open_network,
                                    output_paths, predict_all, read_photo, start_processes, tell)


def main(args):
    # 1. The photographs, their FOV masks and their outputs, every name checked before any work
    check_args(args)
    inputs = list_inputs(args.img)
    folder = os.path.isdir(args.img)
    listing = files_by_stem(args.roi_mask) if args.roi_mask and os.path.isdir(args.roi_mask) else None
    mask_files = [attempt(find_mask, args.roi_mask, p, listing) for p in inputs]
    if not folder and isinstance(mask_files[0], Exception):
        raise mask_files[0]
    plans = output_paths(args, inputs, [m for m in mask_files if not isinstance(m, Exception)])
    # 2. The processes (torchrun shares a folder) and the model
    weights = weights_or_default(args.weights, av=args.av)
    proc, device = start_processes("cpu" if weights.lower().endswith(".onnx") else args.device)
    try:
        table = measurements_table(args, plans, inputs, rank=proc.rank if proc.distributed else None)
        net = open_network(weights, device, args)
        check_model(net, args)
        if args.tta is None:  # a recipe that validated with flip averaging is meant to be used with it
            args.tta = bool(net.saved.get("eval_tta", False))
        if args.threshold is None:  # the threshold the model was shipped with, if any
            args.threshold = net.threshold
        if args.workers is None:  # on 2 CPU cores a reading thread only takes them from the network (measured)
            args.workers = 0 if net.device.type == "cpu" else 1
        tell(f"using {net.device.type} device; model {src.describe(**net.kwargs)} from '{weights}'"
              + (f"; {proc.world_size} processes share the photographs" if proc.distributed else ""))
        if args.roi_mask is None:
            tell("no --roi-mask given: the field of view is estimated from each image's dark border")
        # 3. What is left to do, then the photographs
        run = PhotoRun(args, inputs, plans, folder, proc, table)
        todo = run.todo(dict(weights=file_digest(weights), tta=args.tta, threshold=args.threshold,
                             amp=net.amp_dtype and str(net.amp_dtype), tile_size=args.tile_size,
                             tile_overlap=args.tile_overlap, roi_mask=args.roi_mask,
                             measure=args.measure and [args.pixel_size, args.fov_angle, args.measure_diameter],
                             **({"av": True} if args.av else {})))
        start = time.perf_counter()
        predict_all(net, run, todo, lambda i: read_photo(inputs[i], mask_files[i], net.fov_diameter, net.multiple,
                                                          net.kwargs["model"], net.fov_diameter_max), args)
        run.summary(todo, time.perf_counter() - start)
    finally:
        dist_utils.cleanup_distributed()  # gloo's threads stopped before the process ends


if __name__ == "__main__":
    run_cli(main, cli_args, debug=cli_args.debug)
