"""Shared fixtures: a tiny synthetic DRIVE root, a small disk to fill, and a runner for the scripts."""
import os
import shutil
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


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(size)``: the folder of a new tmpfs of ``size`` bytes, to fill up; unmounted after the test.

    Mounting needs root: where it fails, the test is skipped (the monkeypatched
    ENOSPC tests run everywhere).
    """
    mounted = []

    def mount(size):
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        try:
            ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                capture_output=True).returncode == 0
        except OSError:
            ok = False
        if not ok:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def leave_free(folder, size):
    """Fill the disk of ``folder`` with a file until about ``size`` bytes are left free."""
    with open(os.path.join(folder, "filler"), "wb") as f:
        f.write(b"\0" * max(shutil.disk_usage(folder).free - size, 0))


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
