"""The pictures of one training run: ``curves.png``, ``val_preview.png`` and, with ``--tensorboard``, TensorBoard logs.

``train.py``'s ``main`` makes one :class:`TrainingPictures` for the run, calls
its ``after_epoch`` once per validated epoch and its ``after_best`` when the
validation dice improves, and closes it when training ends. In
``--output-dir`` they keep:

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
from .metrics import IGNORE_INDEX, DiceCoefficient

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
    """(logits ``[1, C, H, W]``, target ``[1, H, W]``), both on ``device`` (default: the model's), of
    ``dataset[index]`` with an inference copy of ``model`` (BatchNorm folded, eval mode, float32), in tiles
    when the image is larger than ``tile_size``, as validation predicts it."""
    from .inference import evaluation_log_probs, inference_model

    image, target = dataset[index]
    device = device or next(model.parameters()).device
    net = inference_model(model, channels_last=False)
    logits = evaluation_log_probs(net, image[None].to(device), tile_size, multiple=multiple, size=target.shape)
    return logits, target[None].to(device)


def image_dice(logits, target):
    """The validation dice of one image, ``DiceCoefficient`` on its logits ``[1, C, H, W]`` and label
    ``[1, H, W]``: the number validation averages over the images."""
    dice = DiceCoefficient(num_classes=logits.shape[1], ignore_index=IGNORE_INDEX)
    dice.update(logits, target)
    return dice.value.item()


# ---------------------------------------------------------------------------
# one run's pictures: what train.py's main owns


class TrainingPictures:
    """curves.png, val_preview.png and TensorBoard logs of one training run (main process only).

    Make it before any work: with ``tensorboard`` it checks that the package is
    installed, so a missing one is a one-line ``UserError`` before the output
    folder exists. ``last_epoch`` is where the run stops, as in train.py's
    ``range(start_epoch, last_epoch)``: its last epoch (``last_epoch - 1``)
    always redraws ``curves.png``. A ``resumed`` run continues the curves of
    ``log.jsonl``'s earlier epochs, and its TensorBoard log drops the events it
    is about to write again. ``tile_size`` and ``multiple`` predict the preview
    as validation does. ``close()`` (or the end of a ``with`` block) closes the
    TensorBoard writer. On other processes than the main one it does nothing.
    """

    def __init__(self, output_dir, *, plots=True, tensorboard=False, resumed=False, last_epoch, tile_size=0,
                 multiple=16, debug=False):
        if tensorboard:  # every process checks: they all stop alike
            extras.require("--tensorboard", "tensorboard")
        self.output_dir = output_dir
        self.plots = plots
        self.tensorboard = tensorboard
        self.resumed = resumed
        self.last_epoch = last_epoch
        self.tile_size = tile_size
        self.multiple = multiple
        self.debug = debug or os.environ.get("UNET_DEBUG", "") not in ("", "0")
        self.active = (plots or tensorboard) and utils.is_main_process()
        self.history = None  # the records curves.png draws, read from log.jsonl at the first epoch
        self.writer = None   # the TensorBoard writer, opened at the first epoch
        self.warned = set()
        self.last_draw = None  # time.perf_counter() when curves.png was last drawn
        self.draw_seconds = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Close the TensorBoard writer (its events are all on disk afterwards)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def after_epoch(self, record):
        """After each epoch's validation: redraw ``curves.png`` and log the scalars.

        ``record`` is the epoch's ``log.jsonl`` record (``epoch``, ``train_loss``,
        ``lr``, ``dice``, ``auc``, ...), as ``train.log_epoch`` returns it.
        """
        if not self.active:
            return
        epoch = record["epoch"]
        if self.history is None:
            self.history = self.load_history(epoch)
        self.history.append(record)
        if self.plots and self.curves_due(epoch):
            start = time.perf_counter()
            self.safely(CURVES_FILE, plot_curves, self.history, os.path.join(self.output_dir, CURVES_FILE))
            self.curves_done(start)
        if self.tensorboard:
            self.safely("TensorBoard log", self.log_scalars, record)

    def after_best(self, epoch, model, dataset, device=None):
        """When the validation dice improves: ``val_preview.png`` (and the TensorBoard image) from ``model``'s
        prediction of the first validation image (one forward pass)."""
        if self.active:
            self.safely(PREVIEW_FILE, self.write_preview, epoch, model, dataset, device)

    def safely(self, what, fn, *a):
        """Run ``fn(*a)``; a failure is a one-line warning (once per ``what``), never the end of training."""
        try:
            return fn(*a)
        except Exception as e:  # noqa: BLE001 - pictures are a by-product: training goes on
            if self.debug:
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
        return (epoch >= self.last_epoch - 1 or self.last_draw is None
                or time.perf_counter() - self.last_draw >= CURVES_TIME_SHARE * self.draw_seconds)

    def curves_done(self, start):
        self.last_draw = time.perf_counter()
        self.draw_seconds = self.last_draw - start

    def load_history(self, epoch):
        """Earlier epochs of a resumed run, from ``log.jsonl`` (the last record of each epoch before ``epoch``)."""
        records = {}
        path = os.path.join(self.output_dir, "log.jsonl")
        if self.resumed and epoch > 0 and os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(r, dict) and isinstance(r.get("epoch"), int) and r["epoch"] < epoch:
                        records[r["epoch"]] = r
        return [records[e] for e in sorted(records)]

    def tensorboard_writer(self, epoch):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the events a resumed run is about to write again
            self.writer = SummaryWriter(os.path.join(self.output_dir, TENSORBOARD_DIR),
                                        purge_step=epoch if self.resumed else None)
        return self.writer

    def log_scalars(self, record):
        writer, epoch = self.tensorboard_writer(record["epoch"]), record["epoch"]
        writer.add_scalar("train/loss", record["train_loss"], epoch)
        writer.add_scalar("train/lr", record["lr"], epoch)
        writer.add_scalar("train/epoch_time", record["epoch_time"], epoch)
        for k, v in record.items():
            if (k not in ("epoch", "train_loss", "lr", "epoch_time") and isinstance(v, (int, float))
                    and math.isfinite(v)):
                writer.add_scalar(f"val/{k}", v, epoch)
        writer.flush()

    def write_preview(self, epoch, model, dataset, device):
        logits, target = predict_preview(model, dataset, 0, device, self.tile_size, self.multiple)
        name = os.path.basename(dataset.img_list[0]) if hasattr(dataset, "img_list") else "image 0"
        picture = preview_picture(logits.argmax(1)[0].cpu().numpy(), target[0].cpu().numpy(),
                                  f"best model, epoch {epoch}: {name}, dice {image_dice(logits, target):.3f}")
        if self.plots:
            write_png_atomic(os.path.join(self.output_dir, PREVIEW_FILE), picture.save)
        if self.tensorboard:
            writer = self.tensorboard_writer(epoch)
            writer.add_image("val/preview", np.asarray(picture), epoch, dataformats="HWC")
            writer.flush()
