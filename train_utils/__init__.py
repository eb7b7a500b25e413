"""Training utilities: losses, the train/eval engine, metrics, transforms, checkpoints; the tutorial's names
importable from the package itself (``from train_utils import train_one_epoch, evaluate, create_lr_scheduler``).
"""
import importlib

# Each name is imported from its module on first use (PEP 562), not here: the scripts import
# ``train_utils.allocator`` before torch loads, to re-execute themselves with a fast allocator, and
# ``--help`` must stay fast, so importing the package must not import torch.
_EXPORTS = {
    "train_one_epoch": "train_and_eval",
    "evaluate": "train_and_eval",
    "create_lr_scheduler": "train_and_eval",
    "init_distributed_mode": "distributed_utils",
    "save_on_master": "distributed_utils",
    "mkdir": "distributed_utils",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
