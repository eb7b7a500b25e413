"""Checkpoints: plain-data state written atomically, loaded with ``weights_only=True``, resume and per-epoch save.

A checkpoint is a dict: ``model``, ``optimizer``, ``lr_scheduler``, ``scaler``
(with AMP), ``epoch``, ``best_dice``, ``rng`` and ``args``, the run's settings
as a plain dict, from which the model is rebuilt. The tutorial's own
checkpoints (``args`` an ``argparse.Namespace``, no ``base_c``: its U-Net is
``base_c=32``) load too.
"""
import argparse
import io
import os
import pickle
import pickletools
import random
import zipfile

import numpy as np
import torch

import src

from . import distributed_utils as utils
from .errors import UserError
from .files import Behind, atomic_write, require_free_space
from .settings import DRIVE_MEAN, DRIVE_STD, MODEL_KEYS


def plain_args(args):
    """The tutorial's pickled ``argparse.Namespace`` as a plain dict (lists and scalars only)."""
    plain = (str, int, float, bool, type(None))
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, (list, tuple)) and all(isinstance(i, plain) for i in v):
            out[k] = list(v)
        elif isinstance(v, plain):
            out[k] = v
    return out


def model_kwargs(args: dict):
    """``src.build_model`` keyword arguments from a checkpoint's (or the command line's) ``args`` dict.

    ``num_classes`` in ``args`` counts foreground classes, as ``--num-classes``
    does; the model has one more output channel for the background.
    """
    a = {k: args.get(k, default) for k, default in MODEL_KEYS.items()}
    return {"model": a["model"], "num_classes": int(a["num_classes"]) + 1, "base_c": int(a["base_c"])}


def save_checkpoint(state, path):
    """Write ``state`` to ``path`` atomically and durably: a crash at any moment leaves the previous file."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(state, f)

    atomic_write(path, write, durable=True)


def safe_load(path, map_location="cpu", what="checkpoint"):
    """``torch.load(path, weights_only=True)`` with every failure as one clear ``UserError``.

    ``weights_only=True`` makes the unpickler reject every object that could run
    code, before it runs; the refusal names the file.
    """
    if os.path.isdir(path):
        inside = [n for n in ("checkpoint.pth", "best_model.pth") if os.path.isfile(os.path.join(path, n))]
        raise UserError(f"{what} '{path}' is a folder: name the file in it"
                        + (f" ({' or '.join(inside)})" if inside else ""))
    if not os.path.isfile(path):
        raise UserError(f"{what} '{path}' not found")
    if os.path.getsize(path) == 0:
        raise UserError(f"{what} '{path}' is an empty file")
    try:
        # The tutorial pickled its argparse.Namespace into every checkpoint: allow that class and nothing else.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if not (zipfile.is_zipfile(path) or _is_pickle(path)):
            raise UserError(f"'{path}' is not a readable PyTorch {what}: neither a zip archive nor a pickle "
                            "(a corrupt or truncated file?)") from None
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")
        raise UserError(f"refusing to load '{path}': it holds objects other than tensors and plain data, "
                        f"which could run code ({reason})") from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds (KeyError, RuntimeError, EOFError, ...) for junk
        raise UserError(f"'{path}' is not a readable PyTorch {what} ({' '.join(str(e).split())[:200]})") from None


def _is_pickle(path):
    """Whether ``path`` starts with a well-formed pickle: read opcode by opcode, nothing is run or built.

    Told apart (with zip archives, torch's format) so that a file of random
    bytes, which ``weights_only`` also rejects, is called corrupt rather than dangerous.
    """
    try:
        with open(path, "rb") as f, open(os.devnull, "w") as sink:
            pickletools.dis(f, out=sink)
        return True
    except Exception:  # noqa: BLE001 - any failure to parse means "not a pickle"
        return False


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint of this project or of the tutorial and check it has what the scripts need.

    The tutorial's ``args`` (an ``argparse.Namespace``) comes back as a plain dict.
    """
    ckpt = safe_load(path, map_location)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"'{path}' is not a U-Net checkpoint (no 'model' state dict in it)")
    saved = ckpt.get("args", {})
    if isinstance(saved, argparse.Namespace):
        ckpt["args"] = plain_args(saved)
    elif not isinstance(saved, dict):
        raise UserError(f"'{path}' has no usable 'args' dict")
    return ckpt


def normalisation(saved: dict):
    """(mean, std) as lists of floats that the model of a checkpoint's ``args`` (or an export's metadata)
    expects; the tutorial's checkpoints hold none: DRIVE's, which its model was trained with."""
    return [float(v) for v in saved.get("mean") or DRIVE_MEAN], [float(v) for v in saved.get("std") or DRIVE_STD]


def model_from_checkpoint(path, purpose="predict.py reads RGB photographs"):
    """(model with the checkpoint's weights, on the CPU in eval mode, the checkpoint, ``build_model`` kwargs).

    The model, its size and class count come from the checkpoint's ``args``
    (this project's or the tutorial's), so nothing is retyped by hand.
    """
    ckpt = load_checkpoint(path, map_location="cpu")
    saved = ckpt.get("args", {})
    if saved.get("in_channels", 3) != 3:  # the tutorial's UNet takes any channel count; these scripts read RGB
        raise UserError(f"checkpoint '{path}' is for {saved['in_channels']}-channel input; {purpose}")
    kwargs = model_kwargs(saved)
    try:
        model = src.build_model(**kwargs)
    except ValueError as e:
        raise UserError(f"checkpoint '{path}': {e}") from None
    load_model_state(model, ckpt["model"], path)
    return model.eval(), ckpt, kwargs


def load_model_state(model, state_dict, path):
    """``model.load_state_dict`` with a one-line error instead of a list of shape mismatches."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else ""
        raise UserError(f"checkpoint '{path}' does not fit the model: {detail[:300]}") from None


def init_weights(model, path):
    """Start ``model`` from the weights of another run's checkpoint or exported ``.pth`` (``--init-weights``), of
    the same architecture; returns the line train.py prints.

    The output layer may have more classes than the file's: a one-class vessel model gives its background
    output to the background and its vessel output to every other class, so an artery/vein model starts by
    drawing the vessels it already finds, half artery, half vein, and training only has to tell them apart.
    """
    state = load_checkpoint(path)["model"]
    own = model.state_dict()
    grown = []
    for name, value in state.items():
        mine = own.get(name)
        if mine is None or mine.shape == value.shape:
            continue
        if value.shape[1:] != mine.shape[1:] or value.shape[0] != 2 or mine.shape[0] < 2:
            raise UserError(f"--init-weights '{path}' does not fit the model: {name} is {tuple(value.shape)} "
                            f"there and {tuple(mine.shape)} here (another --model or --base-c?)")
        state[name] = torch.cat([value[:1]] + [value[1:2]] * (mine.shape[0] - 1))
        grown.append(name)
    load_model_state(model, state, path)
    return (f"initial weights: '{path}'"
            + (f" (its vessel output copied to each of {own[grown[0]].shape[0] - 1} classes)" if grown else ""))


def resume(checkpoint, path, model, optimizer=None, lr_scheduler=None, scaler=None, rank=0, world_size=1):
    """Restore a run from ``checkpoint``: the model, and with ``optimizer`` the whole training state.

    Returns (first epoch to train, best dice so far). The best dice comes back
    too, so the first epoch after a resume does not overwrite a better
    ``best_model.pth``; each process gets back its own random streams.
    """
    load_model_state(model, checkpoint["model"], path)
    if optimizer is None:
        return 0, float(checkpoint.get("best_dice", 0.0))
    if "optimizer" not in checkpoint or "epoch" not in checkpoint:
        raise UserError(f"'{path}' holds weights only (no optimizer state or epoch); "
                        "use it with --test-only or predict.py, or resume from checkpoint.pth")
    optimizer.load_state_dict(checkpoint["optimizer"])
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    if "scaler" in checkpoint and scaler is not None and scaler.is_enabled():
        scaler.load_state_dict(checkpoint["scaler"])
    rng = checkpoint.get("rng")
    if rng and len(rng) == world_size:
        set_rng_state(rng[rank])
    return int(checkpoint["epoch"]) + 1, float(checkpoint.get("best_dice", 0.0))


def save_epoch(output_dir, model, optimizer, lr_scheduler, scaler, epoch, best_dice, is_best, settings,
               writer=None):
    """Write the epoch's checkpoints: ``checkpoint.pth`` always, ``best_model.pth`` when it is the best
    (``model_N.pth`` every epoch with ``save_best`` off). Every process calls it; the main one writes, now or,
    with a ``CheckpointWriter``, behind training. ``settings`` (train_utils.settings.Settings) go in as ``args``:
    what rebuilds the model and resumes the run."""
    rngs = gather_rng_states()  # a collective: every process takes part
    if not utils.is_main_process():
        return
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "best_dice": best_dice,
             "args": settings.checkpoint_args(), "rng": rngs}
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    # best_model.pth first: a crash between the two writes then never leaves a
    # checkpoint.pth whose best_dice claims a best model that is not on disk.
    paths = []
    if settings.save_best and is_best:
        paths.append(os.path.join(output_dir, "best_model.pth"))
    elif not settings.save_best:
        paths.append(os.path.join(output_dir, f"model_{epoch}.pth"))
    paths.append(os.path.join(output_dir, "checkpoint.pth"))
    if writer is None:
        write_checkpoints(state, paths)
    else:
        writer.write(state, paths)


def write_checkpoints(state, paths):
    for path in paths:
        save_checkpoint(state, path)


class CheckpointWriter(Behind):
    """Writes the epochs' checkpoints in a thread while the next epoch trains.

    Serialising a checkpoint and waiting for it to reach the disk take the
    same time however fast the epoch is: on a GPU an epoch can take less. So
    ``write`` copies the state to the host at once (the training changes the
    weights in place) and leaves the writing to the thread. One write at a
    time: the next ``write`` waits for the last, so a failed write (a full
    disk) stops training there; leaving the ``with`` block waits too, so a
    run that stops for any reason leaves its last checkpoint whole.
    """

    def write(self, state, paths):
        self.submit(write_checkpoints, host_copy(state), paths)


def host_copy(value):
    """``value`` (dicts, lists, tuples of tensors and plain values) with every container and tensor copied, the
    tensors to the CPU: what later changes to the original cannot reach."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: host_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(host_copy(v) for v in value)
    return value


# Per-parameter state tensors each optimiser keeps, which its checkpoint stores: SGD's momentum buffer, the two
# moments of Adam(W).
OPTIMIZER_STATE_COPIES = {"SGD": 1, "Adam": 2, "AdamW": 2}


def checkpoint_bytes(model, optimizer):
    """About the size of a checkpoint of ``model`` trained by ``optimizer``: the state dict, the optimiser's
    per-parameter state, and a margin (10 %, and 1 MiB for the settings, the RNG states and the archive)."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    params = sum(p.numel() * p.element_size() for group in optimizer.param_groups for p in group["params"])
    copies = OPTIMIZER_STATE_COPIES.get(type(optimizer).__name__, 2)
    return int(1.1 * (state + copies * params)) + 2 ** 20


def require_checkpoint_space(output_dir, model, optimizer, save_best, epoch):
    """Before the first epoch: a ``UserError`` unless ``output_dir`` has room for the checkpoints it writes.

    That is one checkpoint for each of the first epoch's files that does not
    exist yet (``checkpoint.pth``, and ``best_model.pth`` or ``model_<epoch>.pth``),
    at least one: rewriting a file needs room for its temporary copy.
    """
    names = ["checkpoint.pth", "best_model.pth" if save_best else f"model_{epoch}.pth"]
    new = [n for n in names if not os.path.exists(os.path.join(output_dir, n))]
    size = checkpoint_bytes(model, optimizer)
    count = max(1, len(new))
    require_free_space(output_dir, count * size,
                       f"{count} checkpoint{'s' * (count > 1)} of this model (about {size / 2 ** 20:.1f} MiB each)")


def gather_rng_states():
    """Every process's RNG states (a list by rank), so a resumed DDP run continues each stream."""
    state = rng_state()
    if not utils.is_dist_avail_and_initialized():
        return [state]
    # all_gather_object cannot carry tensors on every backend; ship each state as torch.save bytes.
    buf = io.BytesIO()
    torch.save(state, buf)
    blobs = [None] * utils.get_world_size()
    torch.distributed.all_gather_object(blobs, buf.getvalue())
    return [torch.load(io.BytesIO(b), weights_only=True) for b in blobs]


def rng_state():
    """The random generators' states as plain data (numpy's array stored as a tensor)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
