"""Pictures of a training run: ``curves.png``, ``val_preview.png`` and, with ``--tensorboard``, TensorBoard logs.

``train.py`` calls :func:`after_epoch` once per epoch and :func:`after_best`
when the validation dice improves. In ``--output-dir`` they keep:

- ``curves.png``: training loss, learning rate, validation dice and ROC AUC
  against the epoch, rewritten after every epoch (open it again to watch a
  run); when epochs are shorter than about 1.5 s (the CPU demo), every few
  epochs and after the last, so drawing never takes more than a tenth of the run;
- ``val_preview.png``: the first validation image as the best model predicts it,
  against the label: vessels found (true positives) white, false alarms
  (false positives) magenta, missed vessels (false negatives) blue, background
  black, outside the field of view dark grey; at most 600 pixels a side (plus a
  title and a legend line);
- ``tensorboard/`` (``--tensorboard``): the same numbers as scalars and the
  preview as an image, for ``tensorboard --logdir OUTPUT_DIR``.

Only the main process draws or writes, and every picture is written to a
temporary name and renamed, so a reader never sees half a file. Drawing never
stops training: a failure is one ``warning:`` line (with ``--debug`` or
``UNET_DEBUG=1`` it raises instead, so bugs are not hidden).
"""
import argparse
import atexit
import json
import math
import os
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from . import distributed_utils as utils
from . import extras
from .files import atomic_write

CURVES_FILE = "curves.png"
PREVIEW_FILE = "val_preview.png"
TENSORBOARD_DIR = "tensorboard"
PREVIEW_MAX_SIDE = 600
CURVES_TIME_SHARE = 10  # redraw curves.png when at least this many times its drawing time has passed

# Colours of the validation preview (RGB).
TP_COLOUR = (255, 255, 255)  # vessel predicted and labelled
FP_COLOUR = (255, 0, 255)    # predicted, not labelled: false alarm
FN_COLOUR = (30, 144, 255)   # labelled, not predicted: missed vessel
TN_COLOUR = (0, 0, 0)        # background, inside the field of view
OUTSIDE_COLOUR = (40, 40, 40)  # outside the field of view (target 255): not scored
LEGEND = ((TP_COLOUR, "vessel found"), (FP_COLOUR, "false alarm"), (FN_COLOUR, "missed vessel"))
IGNORE_INDEX = 255


class TensorBoardFlag(argparse.Action):
    """``--tensorboard``: a switch that checks, when the command line is read, that the package is installed."""

    def __init__(self, option_strings, dest, default=False, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=default, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if not extras.available("tensorboard"):
            print(f"error: {extras.missing_message(option_string, ['tensorboard'])}", file=sys.stderr)
            sys.exit(2)
        setattr(namespace, self.dest, True)


# ---------------------------------------------------------------------------
# the pictures themselves (pure functions: tested directly)


def write_png_atomic(path, write):
    """Call ``write(tmp_path)`` then rename the file to ``path``: readers see the old picture or the new one."""
    atomic_write(path, write, suffix=".png")


def _values(history, key):
    return np.array([math.nan if r.get(key) is None else float(r[key]) for r in history], dtype=float)


def plot_curves(history, path):
    """Write ``path`` (PNG): four panels, training loss, learning rate, validation dice and AUC against the epoch.

    ``history`` is a list of per-epoch dicts with ``epoch``, ``train_loss``, ``lr``, ``dice`` and ``auc``
    (None or NaN where undefined). Uses matplotlib's object-oriented API with the Agg canvas, so it
    never touches pyplot's global state or needs a display.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = _values(history, "epoch")
    fig = Figure(figsize=(8, 5.6), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True)
    marker = "o" if len(history) <= 40 else None
    panels = (("train_loss", "training loss", "tab:blue"), ("lr", "learning rate", "tab:gray"),
              ("dice", "validation dice", "tab:green"), ("auc", "validation ROC AUC (inside the FOV)", "tab:purple"))
    for ax, (key, title, colour) in zip(axes.flat, panels):
        values = _values(history, key)
        ax.plot(epochs, values, color=colour, marker=marker, markersize=3, linewidth=1.5)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if key == "dice" and np.isfinite(values).any():
            best = int(np.nanargmax(values))
            ax.plot(epochs[best], values[best], "*", color="tab:red", markersize=10,
                    label=f"best {values[best]:.3f} (epoch {int(epochs[best])})")
            ax.legend(loc="lower right", fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("epoch", fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.95, bottom=0.09, hspace=0.25, wspace=0.2)
    write_png_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))


def preview_colours(pred, target, ignore_index=IGNORE_INDEX):
    """RGB uint8 ``[H, W, 3]`` comparing a predicted class map with the label, both ``[H, W]``.

    A pixel is a vessel when its class is not the background (0); ``target == ignore_index`` marks the
    pixels outside the field of view, which are not scored and drawn dark grey.
    """
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and label {target.shape} differ in size")
    inside = target != ignore_index
    p, t = (pred > 0) & inside, (target > 0) & inside
    out = np.empty(pred.shape + (3,), dtype=np.uint8)
    out[:] = OUTSIDE_COLOUR
    for sel, colour in ((inside & ~p & ~t, TN_COLOUR), (p & t, TP_COLOUR), (p & ~t, FP_COLOUR),
                        (~p & t, FN_COLOUR)):
        out[sel] = colour
    return out


def preview_scale(height, width, max_side=PREVIEW_MAX_SIDE, enlarge_to=PREVIEW_MAX_SIDE):
    """The (height, width) of the preview image: shrunk so the longer side is at most ``max_side`` (a
    DRIVE image, 565 x 584, stays as it is); smaller than ``enlarge_to``, enlarged by a whole factor
    (pixels stay crisp) so it is not tiny on screen."""
    longer = max(height, width)
    if longer > max_side:
        f = max_side / longer
        return max(1, round(height * f)), max(1, round(width * f))
    k = max(1, enlarge_to // longer)
    return height * k, width * k


def preview_picture(pred, target, title=""):
    """The preview as a PIL image: the colour-coded comparison (at most ``PREVIEW_MAX_SIDE`` pixels a side),
    a title line above and a legend below."""
    colours = preview_colours(pred, target)
    h, w = colours.shape[:2]
    line = 18
    nh, nw = preview_scale(h, w, enlarge_to=PREVIEW_MAX_SIDE - 3 * line)  # enlarged: with text, within 600
    im = Image.fromarray(colours)
    if (nh, nw) != (h, w):
        # Shrinking averages each output pixel's area, so thin vessels stay visible; enlarging repeats pixels.
        im = im.resize((nw, nh), Image.Resampling.BOX if nh < h else Image.Resampling.NEAREST)
    try:
        font = ImageFont.load_default(size=13)  # Pillow >= 10.1 with FreeType
    except (TypeError, ImportError, OSError):
        font = ImageFont.load_default()
    legend_rows = [[]]
    x = 4
    for colour, text in LEGEND:  # wrap the legend when the picture is narrow
        width = 15 + int(font.getlength(text)) + 14
        if legend_rows[-1] and x + width > nw:
            legend_rows.append([])
            x = 4
        legend_rows[-1].append((x, colour, text))
        x += width
    top = line if title else 0
    canvas = Image.new("RGB", (nw, top + nh + line * len(legend_rows)), (255, 255, 255))
    canvas.paste(im, (0, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0), font=font)
    for r, row in enumerate(legend_rows):
        y = top + nh + r * line + 3
        for x, colour, text in row:
            draw.rectangle([x, y, x + 10, y + 10], fill=colour, outline=(0, 0, 0))
            draw.text((x + 15, y - 2), text, fill=(0, 0, 0), font=font)
    return canvas


@torch.inference_mode()
def predict_preview(model, dataset, index=0, device=None, tile_size=0, multiple=16):
    """(predicted class map, target), both numpy ``[H, W]``, of ``dataset[index]`` with an inference copy of
    ``model`` (BatchNorm folded, eval mode, float32), on ``device`` (default: the model's), in tiles when
    the image is larger than ``tile_size``, as validation predicts it."""
    from .inference import evaluation_logits, inference_model

    image, target = dataset[index]
    device = device or next(model.parameters()).device
    net = inference_model(model, channels_last=False)
    logits = evaluation_logits(net, image[None].to(device), tile_size, multiple=multiple)
    return logits.argmax(1)[0].cpu().numpy(), target.cpu().numpy()


def image_dice(pred, target, ignore_index=IGNORE_INDEX):
    """Dice of the foreground (all classes pooled) inside the field of view of one image; NaN without either."""
    inside = target != ignore_index
    p, t = (pred > 0) & inside, (target > 0) & inside
    denom = p.sum() + t.sum()
    return 2.0 * (p & t).sum() / denom if denom else math.nan


# ---------------------------------------------------------------------------
# the run's state and the two hooks train.py calls


def _plots(args):
    return getattr(args, "plots", True)


def _tensorboard(args):
    return getattr(args, "tensorboard", False)


def _debug(args):
    return getattr(args, "debug", False) or os.environ.get("UNET_DEBUG", "") not in ("", "0")


class _RunVisuals:
    """What one training run keeps between epochs: the metric history, the TensorBoard writer, warnings given."""

    def __init__(self, args):
        self.args = args
        self.history = None
        self.writer = None
        self.warned = set()
        self.last_draw = None  # time.perf_counter() when curves.png was last drawn
        self.draw_seconds = 0.0

    def safely(self, what, fn, *a):
        """Run ``fn(*a)``; a failure is a one-line warning (once per ``what``), never the end of training."""
        try:
            return fn(*a)
        except Exception as e:  # noqa: BLE001 - pictures are a by-product: training goes on
            if _debug(self.args):
                raise
            if what not in self.warned:
                self.warned.add(what)
                hint = " (pip install -r requirements.txt)" if isinstance(e, ImportError) else ""
                msg = " ".join(str(e).split()) or type(e).__name__
                print(f"warning: {what} not written: {type(e).__name__}: {msg}{hint}; training continues",
                      file=sys.stderr, flush=True)
            return None

    def curves_due(self, epoch):
        """Redraw now? Yes after every epoch, except that drawing (~0.15 s) may take at most a tenth of the
        time: epochs shorter than that (the CPU demo's take 0.6 s) are drawn every few epochs. The last
        epoch of the run is always drawn."""
        stop = getattr(self.args, "stop_epoch", None)
        last = min(self.args.epochs, stop + 1 if stop is not None else self.args.epochs) - 1
        return (epoch >= last or self.last_draw is None
                or time.perf_counter() - self.last_draw >= CURVES_TIME_SHARE * self.draw_seconds)

    def curves_done(self, start):
        self.last_draw = time.perf_counter()
        self.draw_seconds = self.last_draw - start

    def load_history(self, epoch):
        """Earlier epochs of a resumed run, from ``log.jsonl`` (the last record of each epoch before ``epoch``)."""
        records = {}
        path = os.path.join(self.args.output_dir, "log.jsonl")
        if self.args.resume and epoch > 0 and os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(r, dict) and isinstance(r.get("epoch"), int) and r["epoch"] < epoch:
                        records[r["epoch"]] = r
        return [records[e] for e in sorted(records)]

    def tensorboard(self, epoch):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the events a resumed run is about to write again
            self.writer = SummaryWriter(os.path.join(self.args.output_dir, TENSORBOARD_DIR),
                                        purge_step=epoch if self.args.resume else None)
        return self.writer

    def log_scalars(self, record):
        writer, epoch = self.tensorboard(record["epoch"]), record["epoch"]
        writer.add_scalar("train/loss", record["train_loss"], epoch)
        writer.add_scalar("train/lr", record["lr"], epoch)
        writer.add_scalar("train/epoch_time", record["epoch_time"], epoch)
        for k, v in record.items():
            if (k not in ("epoch", "train_loss", "lr", "epoch_time") and isinstance(v, (int, float))
                    and math.isfinite(v)):
                writer.add_scalar(f"val/{k}", v, epoch)
        writer.flush()

    def write_preview(self, epoch, model, dataset, device):
        import src

        pred, target = predict_preview(model, dataset, 0, device, getattr(self.args, "val_tile_size", 0),
                                       src.model_spec(getattr(self.args, "model", "unet")).size_multiple)
        name = os.path.basename(dataset.img_list[0]) if hasattr(dataset, "img_list") else "image 0"
        picture = preview_picture(pred, target, f"best model, epoch {epoch}: {name}, "
                                                f"dice {image_dice(pred, target):.3f}")
        if _plots(self.args):
            write_png_atomic(os.path.join(self.args.output_dir, PREVIEW_FILE), picture.save)
        if _tensorboard(self.args):
            writer = self.tensorboard(epoch)
            writer.add_image("val/preview", np.asarray(picture), epoch, dataformats="HWC")
            writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


_run = None


def _state(args):
    """The state of the run ``args`` belongs to (a new ``args`` object is a new run, e.g. in tests)."""
    global _run
    if _run is None or _run.args is not args:
        if _run is not None:
            _run.close()
        _run = _RunVisuals(args)
    return _run


@atexit.register
def _close():
    if _run is not None:
        _run.close()


def after_epoch(args, record):
    """After each epoch's validation: redraw ``curves.png`` and log the scalars (main process only).

    ``record`` is the epoch's ``log.jsonl`` record (``epoch``, ``train_loss``,
    ``lr``, ``dice``, ``auc``, ...), as ``train.log_epoch`` returns it.
    """
    if not utils.is_main_process() or not (_plots(args) or _tensorboard(args)):
        return
    run = _state(args)
    epoch = record["epoch"]
    if run.history is None:
        run.history = run.load_history(epoch)
    run.history.append(record)
    if _plots(args) and run.curves_due(epoch):
        start = time.perf_counter()
        run.safely(CURVES_FILE, plot_curves, run.history, os.path.join(args.output_dir, CURVES_FILE))
        run.curves_done(start)
    if _tensorboard(args):
        run.safely("TensorBoard log", run.log_scalars, record)


def after_best(args, epoch, model, dataset, device=None):
    """When the validation dice improves: ``val_preview.png`` (and the TensorBoard image) from ``model``'s
    prediction of the first validation image (main process only; one forward pass)."""
    if not utils.is_main_process() or not (_plots(args) or _tensorboard(args)):
        return
    run = _state(args)
    run.safely(PREVIEW_FILE, run.write_preview, epoch, model, dataset, device)
