"""Shared fixtures: a tiny synthetic DRIVE root and a runner for the scripts."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from train_utils.synthetic import write_synthetic_drive  # noqa: E402

# Small enough that a training epoch takes well under a second on 2 cores.
TINY_TRAIN = ["--base-c", "4", "--crop-size", "48", "--base-size", "64", "-b", "2", "--workers", "0",
              "--device", "cpu", "--print-freq", "100", "--seed", "0"]


@pytest.fixture(scope="session")
def drive_root(tmp_path_factory):
    """4 training and 3 test images of 64 x 60: 3 does not divide by 2 processes."""
    root = str(tmp_path_factory.mktemp("drive"))
    write_synthetic_drive(root, num_train=4, num_test=3, height=64, width=60, seed=1)
    return root


def spread_output(model, x):
    """Rescale ``model``'s output layer so that on the batch ``x`` its classes split the pixels roughly evenly.

    A randomly initialised U-Net's logits barely vary over an image: every pixel
    would be background, and tests comparing predictions would prove nothing.
    """
    with torch.no_grad():
        logits = model.eval()(x)["out"].transpose(0, 1).flatten(1)
        conv = model.out_conv[0]
        scale = 4.0 / logits.std(dim=1).mean().clamp(min=1e-6)
        conv.weight.mul_(scale)
        conv.bias.mul_(scale).sub_(logits.median(dim=1).values * scale)
    return model


def run_script(script, *args, env=None, timeout=300):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    full_env.pop("UNET_DEBUG", None)
    full_env.update(env or {})
    cmd = script if isinstance(script, list) else [sys.executable, os.path.join(ROOT, script)]
    return subprocess.run(cmd + [str(a) for a in args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
