"""A training run's settings: the tutorial's defaults, the recipes, ``--demo``, and the one function that
decides every setting once and records where each value came from.

The parser only says what was typed (every flag's parser default means "not
given"). ``resolve_settings`` then builds the run's settings in one written
order; a later layer wins over an earlier one:

1. ``default``     the tutorial's values (``TUTORIAL``);
2. ``recipe``      ``--recipe``'s values (``RECIPES``);
3. ``dataset``     the dataset's facts: its mean/std, the base size of its
                   photographs, whether it has FOV masks (my_dataset.DATASETS);
4. ``demo``        ``--demo``'s values: its synthetic sample is 128 pixels
                   wide, so its sizes describe its own images and win over
                   the dataset's (the recipe still picks the optimiser,
                   schedule, augmentation and evaluation);
5. ``checkpoint``  what ``--resume`` holds: its model always (``MODEL_KEYS``;
                   typing a different value is an error), the held-out
                   images when resuming (``RESUMED_KEYS``), its recipe's
                   settings unless typed (``RUN_KEYS``);
6. ``flag``        what was typed.

Last, ``derived``: what is still undecided follows from the machine and the
other settings (the AMP dtype, the width of ``--recipe fast``, the crop size,
the loader workers, channels_last). The result is a ``Settings`` object that
nothing changes afterwards; ``describe()`` prints it, one ``name=value
(source)`` entry per setting.
"""
import argparse
import math
import os
from typing import NamedTuple

import src

from .errors import UserError

# The tutorial's DRIVE statistics (compute_mean_std.py) and sizes.
DRIVE_MEAN = (0.709, 0.381, 0.224)
DRIVE_STD = (0.127, 0.079, 0.043)
BASE_SIZE = 565
CROP_SIZE = 480
# The tutorial resizes the shorter side of a training image to a random [0.5, 1.2] x BASE_SIZE.
SCALE_RANGE = (0.5, 1.2)
# The field of view of a photograph without a mask file: estimated from its dark border, or every pixel.
FOV_MODES = ("estimate", "all")

# Every setting of train.py and train_multi_GPU.py with the tutorial's value. None: decided later
# (by the dataset or the machine); the help text of each flag says how.
TUTORIAL = dict(
    # data
    data_path="./", dataset="drive", val_split=0, val_seed=0, val_images=None, fov="estimate", num_classes=1,
    fov_diameter=0, fov_diameter_max=0, base_size=None, crop_size=None, scale_range=SCALE_RANGE, mean=None,
    std=None, workers=None, data_on_device=False,
    # model
    model="unet", base_c=32, pretrained_backbone="", init_weights="", channels_last=None, compile=False,
    # optimisation
    device=None, batch_size=4, epochs=200, start_epoch=0, stop_epoch=None, lr=0.01, momentum=0.9,
    weight_decay=1e-4, opt="sgd", lr_schedule="poly", amp=False, amp_dtype=None, seed=None,
    deterministic=False,
    # recipe and augmentation
    recipe="tutorial", crops_per_image=1, rotate=0.0, color_jitter=0.0, crop_first=None, noise=0.0,
    # loss: the tutorial's cross-entropy + dice, plus this weight of the skeleton recall loss
    skeleton_recall=0.0,
    # evaluation
    eval_tta=False, eval_every=1, val_tile_size=1024, val_batch_size=1, test_only=False,
    # output
    output_dir="save_weights", resume="", save_best=True, print_freq=1, plots=True, tensorboard=False,
    demo=False, debug=False,
    # distributed (train_multi_GPU.py)
    sync_bn=False, world_size=1, dist_url="env://", dist_timeout=30.0,
)

RECIPES = {
    "tutorial": {},
    # AdamW + cosine on many small, varied crops in small batches, mixed precision where it is faster
    # (amp None: decided by the machine), flip-averaged validation every 10 epochs. base_c None: the
    # width its time budget allows at that precision (fast_width).
    "fast": dict(base_c=None, opt="adamw", lr=2e-3, weight_decay=1e-2, lr_schedule="cosine",
                 crop_size=256, batch_size=4, crops_per_image=4, rotate=90.0, color_jitter=0.2,
                 eval_tta=True, eval_every=10, epochs=50, amp=None),
}

# --demo: a run small enough for a laptop CPU that still learns the synthetic vessels.
DEMO = dict(data_path="data/synthetic", output_dir="save_weights/demo", epochs=30, crop_size=96,
            base_size=128, base_c=16, batch_size=4, print_freq=5, device="cpu", seed=0)
DEMO_DATA = dict(num_train=20, num_test=5, height=128, width=124, seed=0)

# What a checkpoint decides. Its model, always (the tutorial saved no model name or width: its model is
# the U-Net with base_c=32); mean/std and the FOV scale (--fov-diameter, --fov-diameter-max) only when it
# holds them.
MODEL_KEYS = {"model": "unet", "num_classes": 1, "base_c": 32}
CARRIED_KEYS = tuple(MODEL_KEYS) + ("mean", "std", "fov_diameter", "fov_diameter_max")
# A resumed run also keeps its held-out validation images.
RESUMED_KEYS = ("dataset", "val_split", "val_seed", "val_images", "fov")
# Everything a recipe decides (and the scale range, the crop-first sampling and the loss, the other training
# settings): a fast run resumes as a fast run and is evaluated with its flip averaging, unless the flag is
# typed again.
RUN_KEYS = ("recipe",) + tuple(sorted({k for r in RECIPES.values() for k in r} - {"base_c"}
                                       | {"scale_range", "crop_first", "noise", "skeleton_recall"}))
# Settings whose value depends on the machine: a checkpoint stores what was asked for (e.g. amp None, "where
# it is faster"), so the machine that resumes decides again.
MACHINE_KEYS = ("device", "amp", "amp_dtype", "workers", "channels_last", "data_on_device")

SOURCES = ("default", "recipe", "dataset", "demo", "checkpoint", "flag", "derived")


class Machine(NamedTuple):
    """What the derived settings depend on."""
    default_device: str  # "cuda" where CUDA is available, else "cpu"
    cpu_bf16: bool  # the CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16)


def fast_width(amp):
    """``--recipe fast``'s U-Net width: the tutorial's 32 where mixed precision runs (a GPU, or a CPU with
    bfloat16 hardware, where its step takes about as long as a float32 step at width 16), 16 in float32,
    where 32 would take about twice the time of 25 tutorial epochs (docs/recipes.md)."""
    return 32 if amp else 16


def default_workers(device_type, batch_size):
    """DataLoader processes: none on the CPU; else min(cpus, batch size, 8).

    On the CPU the loader's processes only compete with the model for the cores,
    and forking a process that holds the model costs seconds per epoch; the
    cached dataset needs no help.
    """
    if device_type == "cpu" or batch_size == 1:
        return 0
    return min(os.cpu_count() or 1, batch_size, 8)


def default_channels_last(device_type, amp_dtype):
    """Train in channels_last on CUDA, and on the CPU only with bfloat16 AMP.

    The CPU's float32 BatchNorm kernel computes batch statistics less exactly
    in channels_last (a first-step loss 1.8e-4 off the float64 value instead
    of 5e-8), which would change the numbers, while oneDNN's bfloat16
    convolutions are much faster in it (a U-Net step 1.4-2.3x).
    """
    return device_type == "cuda" or amp_dtype == "bfloat16"


def amp_dtype_name(device_type, amp, dtype=None):
    """The autocast dtype's name for ``--amp`` (None without): ``dtype`` if named, else float16 on CUDA
    (with the gradient scaler) and bfloat16 on the CPU (no scaler needed: float32's exponent range)."""
    if not amp:
        return None
    return dtype or ("float16" if device_type == "cuda" else "bfloat16")


class Settings:
    """The resolved settings of one run: read-only attributes, and where each value came from."""

    def __init__(self, values, sources, requested):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_sources", dict(sources))
        object.__setattr__(self, "_requested", dict(requested))

    def __getattr__(self, name):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        raise AttributeError(f"settings are decided once, in resolve_settings (tried to set {name})")

    def source(self, name):
        return self._sources[name]

    def as_dict(self):
        return dict(self._values)

    def checkpoint_args(self):
        """What a checkpoint stores: every setting as plain data, the machine-dependent ones as asked for."""
        return {k: _plain(self._requested[k] if k in MACHINE_KEYS else v) for k, v in self._values.items()}

    def describe(self, width=110):
        """``resolved settings:`` and one ``name=value (source)`` entry per setting, wrapped."""
        lines = [""]
        for k, v in self._values.items():
            entry = f"{k}={_shown(v)} ({self._sources[k]})"
            if lines[-1] and len(lines[-1]) + len(entry) + 2 > width:
                lines.append("")
            lines[-1] += (", " if lines[-1] else "") + entry
        return "resolved settings:\n" + "\n".join("  " + line for line in lines)


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _shown(value):
    if isinstance(value, (list, tuple)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return repr(value) if value == "" else str(value)


def _comparable(value):
    """Lists of numbers as floats (mean/std: 1 == 1.0), tuples as lists."""
    if isinstance(value, (list, tuple)):
        return [float(v) if isinstance(v, (int, float)) else v for v in value]
    return value


# Flags that name one value per dataset when training on several (``--dataset drive stare --data-path A B``).
PER_DATASET_KEYS = ("dataset", "data_path", "val_split")


def typed_flags(args):
    """The settings typed on the command line: the parser leaves out every flag not given. A per-dataset
    flag given once is that value (``--dataset stare``: ``"stare"``), several a tuple."""
    given = args if isinstance(args, dict) else vars(args)
    typed = {k: v for k, v in given.items() if k in TUTORIAL}
    for k in PER_DATASET_KEYS:
        if isinstance(typed.get(k), (list, tuple)):
            typed[k] = typed[k][0] if len(typed[k]) == 1 else tuple(typed[k])
    return typed


def per_dataset(value):
    """A per-dataset setting as a list: one dataset's value in a list of one, several as they are."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def checkpoint_layer(typed, saved, path, resuming):
    """The settings a checkpoint decides, after checking that no typed flag contradicts its model."""
    layer = {}
    for key in CARRIED_KEYS + (RESUMED_KEYS if resuming else ()):
        if key in saved:
            layer[key] = saved[key]
        elif key in MODEL_KEYS:
            layer[key] = MODEL_KEYS[key]
        else:
            continue  # e.g. mean/std in a tutorial checkpoint: the run's own values stay
        if key in typed and _comparable(typed[key]) != _comparable(layer[key]):
            flag = "--" + key.replace("_", "-")
            shown = _shown(typed[key]).replace(",", " ")
            raise UserError(f"{flag} {shown} contradicts checkpoint '{path}', which was trained with {key} "
                            f"{_shown(layer[key]).replace(',', ' ')}; leave {flag} out to use the checkpoint's")
    layer.update({k: saved[k] for k in RUN_KEYS if k in saved})
    if layer.get("amp") == "auto":  # how checkpoints of earlier versions said "where it is faster"
        layer["amp"] = None
    return layer


def _stack(layers):
    """Apply ``[(source, {name: value})]`` in order: (values, sources)."""
    values, sources = {}, {}
    for source, layer in layers:
        for k, v in layer.items():
            values[k] = v
            sources[k] = source
    return values, sources


def resolve_settings(args, checkpoint_args=None, machine=None, dataset_facts=None):
    """The run's ``Settings`` from what was typed (``args``: the parsed namespace or a dict), the checkpoint's
    ``args`` dict (``--resume``), the ``Machine`` and a function giving the dataset's facts.

    ``dataset_facts(settings_so_far) -> {name: value}`` (``train.dataset_facts``)
    reads the dataset registry and the training images' sizes.
    """
    typed = typed_flags(args)
    resuming = checkpoint_args is not None and not typed.get("test_only", False)
    ckpt = checkpoint_layer(typed, checkpoint_args, typed.get("resume"), resuming) if checkpoint_args else {}

    def layers(facts):
        recipe = typed.get("recipe", ckpt.get("recipe", TUTORIAL["recipe"]))
        if recipe not in RECIPES:
            raise UserError(f"unknown recipe {recipe!r} (choose from {', '.join(RECIPES)})")
        return [("default", TUTORIAL), ("recipe", RECIPES[recipe]), ("dataset", facts),
                ("demo", DEMO if typed.get("demo") else {}), ("checkpoint", ckpt), ("flag", typed)]

    values, _ = _stack(layers({}))
    check_values(values)
    facts = dataset_facts(values) if dataset_facts is not None else {}
    values, sources = _stack(layers(facts))
    requested = dict(values)
    for name, value in derive(values, machine).items():
        if values.get(name) != value or name not in values:
            sources[name] = "derived"
        values[name] = value
    check_values(values)
    return Settings(values, sources, requested)


def derive(values, machine):
    """The settings that follow from the machine and the others, where nothing decided them."""
    out = {}
    if machine is None:
        return out
    if values["device"] is None:
        out["device"] = machine.default_device
    device_type = (values["device"] or machine.default_device).split(":")[0]
    amp = values["amp"]
    if amp is None:  # the fast recipe: mixed precision where it is faster (emulated bfloat16 is slower)
        amp = device_type == "cuda" or (device_type == "cpu" and machine.cpu_bf16)
    out["amp"] = bool(amp)
    out["amp_dtype"] = amp_dtype_name(device_type, amp, values["amp_dtype"])
    if values["base_c"] is None:
        out["base_c"] = fast_width(amp)
    if values["crop_size"] is None and values["base_size"] is not None:  # 0: each image's own size
        out["crop_size"] = min([CROP_SIZE] + [b for b in per_dataset(values["base_size"]) if b])
    if values["mean"] is None or values["std"] is None:
        mean, std = DRIVE_MEAN, DRIVE_STD
        if values["pretrained_backbone"]:  # an encoder pretrained on ImageNet expects ImageNet's normalisation
            from src.backbone import IMAGENET_MEAN as mean, IMAGENET_STD as std
        out["mean"] = values["mean"] or mean
        out["std"] = values["std"] or std
    if values["workers"] is None:
        out["workers"] = default_workers(device_type, values["batch_size"])
    if values["crop_first"] is None:  # a rotation's geometry is sampled crop-first; the tutorial's stays a chain
        out["crop_first"] = values["rotate"] > 0 or bool(values["data_on_device"])
    channels_last = values["channels_last"]
    out["channels_last"] = (default_channels_last(device_type, out["amp_dtype"]) if channels_last is None
                            else channels_last)
    # Validation (BatchNorm folded away) is exact in channels_last: on unless --no-channels-last.
    out["eval_channels_last"] = channels_last is not False
    return out


def check_values(v):
    """Reject impossible settings before any work starts or anything is written."""
    for name in ("num_classes", "batch_size", "epochs", "crop_size", "base_c", "print_freq", "crops_per_image",
                 "eval_every", "val_batch_size"):
        if v.get(name) is not None and min(per_dataset(v[name])) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {_shown(v[name])})")
    for name in ("lr", "momentum", "weight_decay"):
        if v.get(name) is not None and not (math.isfinite(v[name]) and v[name] >= 0):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number >= 0 (got {v[name]})")
    if v.get("workers") is not None and v["workers"] < 0:
        raise UserError("--workers must be >= 0")
    if v["test_only"] and not v["resume"]:
        raise UserError("--test-only needs the weights to evaluate: --resume PATH (or --weights PATH)")
    if v.get("std") is not None and min(v["std"]) <= 0:
        raise UserError("--std values must be positive")
    if v.get("base_size") is not None and min(per_dataset(v["base_size"])) < 0:
        raise UserError(f"--base-size must be >= 0 (got {_shown(v['base_size'])})")
    if min(per_dataset(v["val_split"])) < 0 or v["val_tile_size"] < 0 or v["fov_diameter"] < 0:
        raise UserError("--val-split, --tile-size and --fov-diameter must be >= 0")
    if v["fov_diameter_max"] and not 0 < v["fov_diameter"] <= v["fov_diameter_max"]:
        raise UserError(f"--fov-diameter-max {v['fov_diameter_max']} needs --fov-diameter between 1 and it "
                        f"(got {v['fov_diameter']})")
    if not 0 <= v["rotate"] <= 180:
        raise UserError(f"--rotate must be in [0, 180] degrees (got {v['rotate']})")
    if v.get("data_on_device") and v.get("crop_first") is False:
        raise UserError("--data-on-device samples each crop in one resample (crop-first): drop --no-crop-first")
    lo, hi = v["scale_range"]
    if not 0 < lo <= hi:
        raise UserError(f"--scale-range needs 0 < MIN <= MAX (got {lo:g} {hi:g})")
    if not (math.isfinite(v["skeleton_recall"]) and v["skeleton_recall"] >= 0):
        raise UserError(f"--skeleton-recall must be a finite number >= 0 (got {v['skeleton_recall']})")
    if not 0 <= v["noise"] <= 1:
        raise UserError(f"--noise must be in [0, 1] (got {v['noise']})")
    if not 0 <= v["color_jitter"] < 1:
        raise UserError(f"--color-jitter must be in [0, 1) (got {v['color_jitter']})")
    least = src.MODELS[v["model"]].size_multiple if v["model"] in src.MODELS else 1
    if v.get("crop_size") is not None and v["crop_size"] < least:
        raise UserError(f"--crop-size {v['crop_size']} is smaller than the {least} pixels the {v['model']} model needs")


def shown_default(value):
    """A default as ``--help`` shows it: on/off, ``a,b`` for a list."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return _shown(value)


def default_text(value):
    """`` (default: X)`` for a flag's help; nothing for None or "" (none, or the help says what decides it)."""
    return "" if value is None or value == "" else f" (default: {shown_default(value)})"


class Flag:
    """Adds one flag to an argparse group (or parser) with its default in the help, and older spellings
    (``--start_epoch``) accepted without cluttering ``--help`` or the usage line.

    The default shown is the parser default when one is given, else the tutorial's value of the setting
    (``TUTORIAL[dest]``): train.py's parser default means "not given" (resolve_settings decides).
    """

    def __init__(self, group, title=""):
        self.group = group
        self.title = title
        self.actions = []  # the flags added, without the older spellings: what docs/training.md lists

    def __call__(self, *names, dest, help, aliases=(), **kw):
        shown = "" if kw.get("action") == "store_true" else default_text(kw.get("default", TUTORIAL.get(dest)))
        self.actions.append(self.group.add_argument(*names, dest=dest, help=help + shown, **kw))
        for alias in aliases:
            self.group.add_argument(alias, dest=dest, help=argparse.SUPPRESS, **kw)
