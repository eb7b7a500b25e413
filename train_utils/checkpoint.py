"""Checkpoint I/O: plain-data state written atomically, loaded with ``weights_only=True``, checked before use."""
import os
import pickle
import random

import numpy as np
import torch

from .errors import UserError

# What a checkpoint's ``args`` must hold to rebuild its model, with the value assumed when absent.
MODEL_KEYS = {"model": "unet", "num_classes": 1, "base_c": 32, "bilinear": True, "in_channels": 3}


def plain_args(args):
    """``vars(args)`` keeping only plain data, so the checkpoint loads with ``weights_only=True``."""
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
    return {"model": a["model"], "num_classes": int(a["num_classes"]) + 1, "in_channels": int(a["in_channels"]),
            "base_c": int(a["base_c"]), "bilinear": bool(a["bilinear"])}


def check_same_model(saved_args: dict, args: dict, path):
    """A clear error when a checkpoint was trained for another model or class count than asked for."""
    saved, wanted = model_kwargs(saved_args), model_kwargs(args)
    diffs = [f"{k} {saved[k]} (asked for {wanted[k]})" for k in saved if saved[k] != wanted[k]]
    if diffs:
        raise UserError(f"checkpoint '{path}' is for another model: " + ", ".join(diffs).replace(
            "num_classes", "classes incl. background"))


def save_checkpoint(state, path):
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, flushed, then renamed.

    A crash or a full disk at any moment leaves the previous file as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def safe_load(path, map_location="cpu", what="checkpoint"):
    """``torch.load(path, weights_only=True)`` with every failure as one clear ``UserError``.

    ``weights_only=True`` makes the unpickler reject every object that could run
    code, before it runs; the refusal names the file.
    """
    if not os.path.isfile(path):
        raise UserError(f"{what} '{path}' not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")
        raise UserError(f"refusing to load '{path}': it holds objects other than tensors and plain data, "
                        f"which could run code ({reason})") from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds (KeyError, RuntimeError, EOFError, ...) for junk
        raise UserError(f"'{path}' is not a readable PyTorch {what} ({' '.join(str(e).split())[:200]})") from None


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint of this project (plain data only) and check it has what the scripts need."""
    ckpt = safe_load(path, map_location)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"'{path}' is not a checkpoint of this project (no 'model' state dict in it)")
    if not isinstance(ckpt.get("args", {}), dict):
        raise UserError(f"'{path}' has no usable 'args' dict")
    return ckpt


def load_model_state(model, state_dict, path):
    """``model.load_state_dict`` with a one-line error instead of a list of shape mismatches."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else ""
        raise UserError(f"checkpoint '{path}' does not fit the model: {detail[:300]}") from None


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
