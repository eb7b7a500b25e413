"""Predicting photographs, the steps predict.py, app.py and the benchmarks share: the model opened for inference
(``open_network``), a photograph read at the model's working scale (``read_photo``), its class probabilities
(``predict_photo``) and its outputs written (``save_outputs``: mask, artery/vein map, probabilities, overlay,
measurements); and predict.py's folder run (``PhotoRun``, ``predict_all``), which finishes and resumes.
"""
import argparse
import os
import time
import traceback
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import Image

import src

from . import distributed_utils as dist_utils
from .checkpoint import model_from_checkpoint, normalisation
from .cli import MEASUREMENTS_CSV
from .cohort import (FAILURE_COLUMNS, FAILURES_CSV, Progress, RowLog, RunRecord, failure_reason, is_done, read_ahead,
                     say, share)
from .errors import UserError
from .files import Behind, DiskFullError, atomic_write, nearest_existing
from .imaging import (ARTERY, IMAGE_EXTS, VEIN, check_min_size, fov_scale, palette_image, photo_fov,
                      read_photograph, stem_of)
from .inference import (check_threshold, inference_model, predict_probabilities, predicted_classes,
                        probabilities_at)
from .precision import autocast_dtype
from .transforms import rescale

OVERLAY_ALPHA = 0.6
# Class colours for overlays and palette masks: background black, then green (vessels), red, blue, ...
CLASS_COLOURS = [(0, 0, 0), (0, 255, 0), (255, 0, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
                 (255, 128, 0), (128, 0, 255), (0, 128, 255), (255, 255, 255)]
# --av's map and overlay: background black, arteries red, veins blue (as artery/vein labels are drawn).
AV_COLOURS = [(0, 0, 0), (255, 0, 0), (0, 0, 255)]


class Outputs(NamedTuple):
    """The files one photograph's outputs go to (each written only where the settings ask for it): the mask,
    ``--save-prob``'s probability, ``--overlay``'s picture, and ``--av``'s artery/vein map and, with
    ``--save-prob``, its artery and vein probabilities."""
    mask: str
    prob: str = ""
    overlay: str = ""
    av: str = ""
    artery_prob: str = ""
    vein_prob: str = ""

    def written(self, args):
        """The paths ``args`` (--save-prob, --overlay, --av) writes, the mask first."""
        av = getattr(args, "av", False)
        wanted = (True, args.save_prob, args.overlay, av, av and args.save_prob, av and args.save_prob)
        return [p for p, on in zip(self, wanted) if on]


def check_args(args):
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {args.batch_size})")
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be at least 0 (got {args.workers})")
    if not args.measure and (args.pixel_size is not None or args.fov_angle is not None):
        raise UserError("--pixel-size and --fov-angle set the units of the measurements: add --measure")
    if args.tile_size < 0 or args.tile_overlap < 0:
        raise UserError("--tile-size and --tile-overlap must be >= 0")
    if args.tile_size and args.tile_overlap >= args.tile_size:
        raise UserError(f"--tile-overlap ({args.tile_overlap}) must be smaller than --tile-size ({args.tile_size})")
    check_threshold(args.threshold)


def check_model(net, args):
    """``--av`` needs an artery/vein model: three outputs (background, artery, vein)."""
    classes = net.kwargs["num_classes"]
    if getattr(args, "av", False) and classes != 3:
        raise UserError(f"--av needs an artery/vein model (background, artery, vein), but the model has "
                        f"{classes} outputs: use the shipped weights/unet_av.pth or one trained on an artery/vein "
                        "dataset")


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
        plans.append(Outputs(base + ".png" if not file_mode else out, *(base + suffix + ".png" for suffix in (
            "_prob", "_overlay", "_av", "_artery_prob", "_vein_prob"))))
    written = [p for plan in plans for p in plan.written(args)]
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



def measurements_table(args, plans, inputs, rank=None):
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
    table = MeasurementsFile(path, rank, av=getattr(args, "av", False))
    warm_up()
    return table


def colour_overlay(image, classes, rows=512, palette=CLASS_COLOURS):
    """The photograph with every foreground class blended in its colour of ``palette`` (computed in strips of
    ``rows``, so a large photograph never has a float copy)."""
    out = np.empty_like(image)
    colours = np.array([palette[c] if c < len(palette) else (255, 255, 255)
                        for c in range(int(classes.max()) + 1)], dtype=np.float32)
    for r in range(0, image.shape[0], rows):
        strip, cls = image[r:r + rows].astype(np.float32), classes[r:r + rows]
        for c in range(1, len(colours)):
            sel = cls == c
            strip[sel] = (1 - OVERLAY_ALPHA) * strip[sel] + OVERLAY_ALPHA * colours[c]
        out[r:r + rows] = np.rint(strip).clip(0, 255).astype(np.uint8)
    return out


@torch.inference_mode()  # the probabilities are inference tensors, changed in place
def save_outputs(probs, image, fov, plan, args, table=None, name=""):
    """Write the outputs ``plan`` (``Outputs``) of one image from its class probabilities [C, H, W], which it may
    overwrite: a large photograph's outputs are made without a second full-size float copy. With a ``table``
    (``--measure``), measure the vessels (and with ``--av`` the arteries and veins) into its row ``name``,
    drawn on the overlay. Returns the seconds the measuring took (0 without)."""
    plan = Outputs(*plan)
    folder = os.path.dirname(plan.mask)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fov_t = torch.from_numpy(fov).to(probs.device)
    num_classes = probs.shape[0]
    av = getattr(args, "av", False)
    classes = predicted_classes(probs, args.threshold).masked_fill_(~fov_t, 0).cpu().numpy()
    if num_classes <= 2 or av:
        save_png(Image.fromarray((classes != 0) * np.uint8(255)), plan.mask)
    else:
        save_png(palette_image(classes, CLASS_COLOURS), plan.mask)
    if av:  # classes: background, and each vessel pixel's more likely class of artery and vein
        save_png(palette_image(classes, AV_COLOURS), plan.av)
        if args.save_prob:
            for cls, path in ((ARTERY, plan.artery_prob), (VEIN, plan.vein_prob)):
                save_png(Image.fromarray(probability_picture(probs[cls], fov_t)), path)
    if args.save_prob:
        save_png(Image.fromarray(probability_picture(probs[0].neg_().add_(1), fov_t)), plan.prob)  # 1 - P(bg)
    measured, seconds = None, 0.0
    if table is not None:
        from .measurements import measure, measure_av
        t0 = time.perf_counter()
        units = (args.pixel_size, args.fov_angle, args.measure_diameter)
        measured = (measure_av(classes, fov, name, *units, image=image) if av
                    else measure(classes == 1, fov, name, *units))
        seconds = time.perf_counter() - t0
    if args.overlay:
        overlay = colour_overlay(image, classes, palette=AV_COLOURS if av else CLASS_COLOURS)
        if measured is not None:
            from .measurements import draw_measurement
            overlay = draw_measurement(overlay, measured)
        save_png(Image.fromarray(overlay), plan.overlay)
    if measured is not None:
        table.add(measured.row)  # last: a row means every output of the photograph is written
    return seconds


def probability_picture(prob, fov_t):
    """A probability map [H, W] (changed in place) as 8-bit 0..255, 0 outside the FOV ``fov_t``."""
    return prob.masked_fill_(~fov_t, 0).clamp_(0, 1).mul_(255).round_().to(torch.uint8).cpu().numpy()


def save_png(image, path):
    """``image`` as the PNG ``path``, whole or not at all (a full disk is one error line)."""
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


# ---------------------------------------------------------------------------
# model


def load_model(weights, device, channels_last=True):
    """The model of a train.py checkpoint, ready for inference, the checkpoint's ``args`` dict and model kwargs."""
    model, ckpt, kwargs = model_from_checkpoint(weights, "predict.py reads RGB photographs")
    return inference_model(model.to(device), channels_last), ckpt.get("args", {}), kwargs


class Network(NamedTuple):
    """A loaded model and what running it takes: the checkpoint's ``args`` (or the export's metadata), its
    ``build_model`` kwargs, the device, the normalisation, the autocast dtype, the size multiple, the FOV
    scale it was trained at (0: none) and its decision threshold (None: the more likely class)."""
    model: object
    saved: dict
    kwargs: dict
    device: torch.device
    mean: list
    std: list
    amp_dtype: object
    multiple: int
    fov_diameter: float
    fov_diameter_max: float = 0
    threshold: Optional[float] = None


def open_network(weights, device, args):
    """The ``Network`` of a checkpoint, or of an ``.onnx`` model (onnxruntime on the CPU, whatever ``device``),
    with ``args``' --device, --amp, --amp-dtype and --channels-last."""
    if weights.lower().endswith(".onnx"):  # exported by export.py: no PyTorch model
        from train_utils.onnx_runtime import load_onnx_model
        model, saved, kwargs, device = load_onnx_model(weights, args.device, args.amp)
    else:
        model, saved, kwargs = load_model(weights, device, args.channels_last)
    mean, std = normalisation(saved)
    return Network(model, saved, kwargs, device, mean, std, autocast_dtype(device, args.amp, args.amp_dtype),
                   src.model_spec(kwargs["model"]).size_multiple, saved.get("fov_diameter") or 0,
                   saved.get("fov_diameter_max") or 0, saved.get("vessel_threshold"))


def run_network(net, works, args):
    """(class probabilities ``[N, C, h, w]`` at the working scale, tiles per image) of the photographs' network
    inputs ``works`` (``Photo.work``, all of one size), as ``args`` (--tile-size, --tta, ...) asks."""
    batch = works[0][None] if len(works) == 1 else torch.stack(works)
    probs, tiles = predict_probabilities(net.model, batch, mean=net.mean, std=net.std, tile_size=args.tile_size,
                                         tile_overlap=args.tile_overlap, batch_size=args.batch_size,
                                         multiple=net.multiple, amp_dtype=net.amp_dtype, tta=args.tta,
                                         channels_last=args.channels_last)
    if net.device.type == "cuda":
        torch.cuda.synchronize(net.device)
    return probs, tiles


@torch.inference_mode()
def predict_photo(net, photo, args):
    """One photograph in memory: (its class probabilities ``[C, H, W]`` at its own size, tiles), what
    ``save_outputs`` takes; the folder run of ``main`` computes the same, a batch at a time."""
    probs, tiles = run_network(net, [photo.work], args)
    return at_photo_size(probs[0], photo), tiles


def at_photo_size(probs, photo):
    """Class probabilities ``[C, h, w]`` from the model's working scale back at the photograph's own size."""
    return probabilities_at(probs[None], photo.image.shape[:2])[0]


class Photo(NamedTuple):
    """A photograph read for the network: as displayed, its FOV, the note for its line, the network's input
    (uint8 ``[3, h, w]``, at the model's working scale) and the seconds reading it took."""
    image: np.ndarray
    fov: np.ndarray
    note: str
    work: torch.Tensor
    seconds: float


def read_photo(path, mask_file, fov_diameter, multiple, model_name, fov_diameter_max=0):
    """The ``Photo`` of one input. A model trained with ``--fov-diameter`` sees the photograph resized so that
    its FOV is that many pixels across, as in training; with ``--fov-diameter-max`` too, a photograph between
    the two keeps its own scale (``imaging.working_diameter``)."""
    t0 = time.perf_counter()
    image = read_photograph(path)
    check_min_size([path], multiple, model_name, [image.shape[1::-1]])
    fov, note = photo_fov(image, mask_file, path)
    work = torch.from_numpy(image).permute(2, 0, 1)
    if fov_diameter:
        work, _ = rescale(work, fov_scale(fov, fov_diameter, fov_diameter_max))
        if min(work.shape[1:]) < multiple:
            raise UserError(f"'{path}' brought to the model's scale (an FOV {fov_diameter:g} pixels across) is "
                            f"{work.shape[2]}x{work.shape[1]} pixels, smaller than the {multiple}x{multiple} the "
                            f"{model_name} model needs")
    return Photo(image, fov, note, work, time.perf_counter() - t0)


def groups(loaded, batch_size):
    """Runs of at most ``batch_size`` consecutive photographs with the same working size, as lists of
    ``(index, photo)``; a failed read comes alone, as ``[(index, exception)]``."""
    group = []
    for i, photo in loaded:
        if isinstance(photo, Exception) or (group and (len(group) == batch_size
                                                       or photo.work.shape != group[0][1].work.shape)):
            if group:
                yield group
            group = []
            if isinstance(photo, Exception):
                yield [(i, photo)]
                continue
        group.append((i, photo))
    if group:
        yield group


def tell(line):
    """A line about the whole run: from the first process only."""
    if dist_utils.is_main_process():
        print(line, flush=True)


def start_processes(device):
    """(process info, torch device): under torchrun each process takes its share of a folder, on its GPU or,
    on the CPU, with gloo; otherwise one process."""
    proc = argparse.Namespace(device=device, dist_url="env://", dist_timeout=30)
    # Every process keeps the real print (numba, under skan's --measure, cannot compile a call to a replaced
    # one): what concerns the whole run is said by the first process alone (``tell``).
    dist_utils.init_distributed_mode(proc, silence_others=False)
    return proc, dist_utils.resolve_device(device, local_rank=proc.gpu, distributed=proc.distributed)


class PhotoRun:
    """One run over the photographs of ``--img``: which are left to do, each one's outputs, row and line when it
    is done or fails, and the summary. A folder's bad photograph is a failure of its own (a line, a row of
    failures.csv, the exit code at the end); a single photograph's failure stops the run with its one line."""

    def __init__(self, args, inputs, plans, folder, proc, table):
        self.args, self.inputs, self.plans, self.folder, self.proc, self.table = args, inputs, plans, folder, proc, table
        out_dir = os.path.dirname(plans[0][0]) or "."
        self.failures = RowLog(os.path.join(out_dir, FAILURES_CSV), FAILURE_COLUMNS,
                               rank=proc.rank if proc.distributed else None)
        self.who = f"rank {proc.rank}: " if proc.distributed else ""  # every process says what it did
        self.failed = []
        self.progress = None

    def todo(self, settings):
        """This process's photographs that need work. A folder run resumes: what the same command already wrote
        is done (outputs are written whole, so they exist only when complete), unless the folder's outputs came
        from another model or other ``settings``. The failures of a run are tried again."""
        proc = self.proc
        record = RunRecord(os.path.dirname(self.failures.path), settings)
        resume = self.folder and record.matches()
        if proc.distributed:
            torch.distributed.barrier()  # every process has read the record before it is written anew
        if self.folder and dist_utils.is_main_process():
            self.failures.reset()
            if not resume and record.exists():
                print(f"'{record.path}' names another model or other settings: every photograph is predicted again")
            record.write()
        if proc.distributed:
            torch.distributed.barrier()
        mine = share(list(range(len(self.inputs))), proc.rank, proc.world_size)
        logs = [self.table.done] if self.table else []
        todo = [i for i in mine if not (resume and is_done(self.outputs(i), stem_of(self.inputs[i]), logs))]
        if len(todo) < len(mine):
            say(f"{self.who}{len(mine) - len(todo)} of the {len(mine)} photographs are done already (their "
                f"outputs exist): {len(todo)} to go")
        self.progress = Progress(len(todo))
        return todo

    def outputs(self, i):
        return self.plans[i].written(self.args)

    def fail(self, i, error):
        if not self.folder or isinstance(error, DiskFullError):  # a full disk fails every photograph after it too
            raise error
        if self.args.debug and not isinstance(error, UserError):
            traceback.print_exception(error)
        reason = failure_reason(error)
        self.failures.append({"image": os.path.basename(self.inputs[i]), "error": reason})
        self.failed.append(i)
        say(f"{self.who}failed: {self.inputs[i]}: {reason}  {self.progress.step()}", err=True)

    def finish(self, i, photo, probs, tiles, seconds):
        t0 = time.perf_counter()
        try:
            measuring = save_outputs(at_photo_size(probs, photo), photo.image, photo.fov, self.plans[i], self.args,
                                     self.table, stem_of(self.inputs[i]))
        except Exception as e:  # noqa: BLE001 - recorded for that photograph; the run goes on
            return self.fail(i, e)
        h, w = photo.image.shape[:2]
        say(f"{self.who}{self.inputs[i]}: {w}x{h}" + (f", {tiles} tiles" if tiles > 1 else "") + photo.note
            + f" -> {self.plans[i].mask}  {seconds + time.perf_counter() - t0:.2f} s"
            + (f" (measured in {measuring:.2f} s)" if self.table else "") + f"  {self.progress.step()}")

    def summary(self, todo, seconds):
        """The counts over every process, their rows in one file each, and a non-zero exit for failures."""
        done, bad = len(todo) - len(self.failed), len(self.failed)
        if self.proc.distributed:
            counts = torch.tensor([done, bad], device=dist_utils.collective_device())
            torch.distributed.all_reduce(counts)  # every process is done appending before the rows are merged
            done, bad = counts.tolist()
        if dist_utils.is_main_process():  # the processes' rows, and a photograph measured again, in one file
            self.failures.merge()
            if self.table is not None:
                self.table.merge()
        if self.proc.distributed:
            torch.distributed.barrier()  # torchrun stops the others when one exits: not before the files are whole
        tell(f"predicted {done} image{'s' * (done != 1)} in {seconds:.2f} s" + (f"; {bad} failed" if bad else ""))
        if self.table is not None:
            n = len(self.inputs) - bad
            tell(f"measurements of {n} image{'s' * (n != 1)}: {self.table.path}")
        if bad:
            raise UserError(f"{bad} of {len(self.inputs)} photographs failed: see '{self.failures.path}' (a row "
                            "each; the same command run again tries them again and skips what is done)")


def predict_all(net, run, todo, read, args):
    """The network over ``todo``: a whole image per forward when it fits in one tile (then --batch-size counts
    images), else tiles. The next photographs are read, and the last one written, while the network runs."""
    with Behind(args.workers) as behind:
        for group in groups(read_ahead(todo, read, args.workers), args.batch_size):
            if isinstance(group[0][1], Exception):
                behind.submit(run.fail, *group[0])
                continue
            t0 = time.perf_counter()
            try:
                probs, tiles = run_network(net, [photo.work for _, photo in group], args)
            except Exception as e:  # noqa: BLE001 - recorded for these photographs; the run goes on
                for i, _ in group:
                    behind.submit(run.fail, i, e)
                continue
            shared = (time.perf_counter() - t0) / len(group)  # the network's time, shared by the batch
            for k, (i, photo) in enumerate(group):
                behind.submit(run.finish, i, photo, probs[k], tiles, photo.seconds + shared)
            del probs


