"""Shared fixtures: a tiny synthetic DRIVE root, a small disk to fill, and a runner for the scripts; the
``cuda`` marker, and CUDA hidden from every test without it."""
import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from train_utils.synthetic import write_synthetic_drive  # noqa: E402

# Every test runs as on a machine without a GPU, CI's, whatever this one has: CUDA is hidden from the test and
# from the scripts and processes it starts, so a GPU user's run checks what CI checks (and pays no GPU start-up
# per script). Only the tests marked ``cuda`` see the GPU; ``pytest -m cuda`` runs just them, and without a GPU
# they skip. The real answer is read first: once the driver has started, hiding the devices from the
# environment changes nothing for this process, only for the ones it starts. A pytest-xdist worker inherits
# the hidden environment, so the machine's own value travels beside it.
_SAVED_VISIBLE_DEVICES = "UNET_TESTS_CUDA_VISIBLE_DEVICES"


def _set_visible_devices(value):
    if value is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = value


_VISIBLE_DEVICES = (json.loads(os.environ[_SAVED_VISIBLE_DEVICES]) if _SAVED_VISIBLE_DEVICES in os.environ
                    else os.environ.get("CUDA_VISIBLE_DEVICES"))
os.environ[_SAVED_VISIBLE_DEVICES] = json.dumps(_VISIBLE_DEVICES)
_set_visible_devices(_VISIBLE_DEVICES)
HAS_CUDA = torch.cuda.is_available()
if HAS_CUDA:
    torch.cuda.init()  # the driver starts now, with the devices visible, whatever checked the count above
_CUDA_IS_AVAILABLE = torch.cuda.is_available


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: a test of the GPU path; it sees the GPU, and skips without one "
                                       "(pytest -m cuda runs just these)")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.cuda.is_available = lambda: False


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="a test of the GPU path: this machine has no CUDA device")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _show_cuda_to_cuda_tests(request, monkeypatch):
    """A test marked ``cuda`` sees the GPU, and so do the scripts it starts."""
    if request.node.get_closest_marker("cuda") is None:
        return
    monkeypatch.setattr(torch.cuda, "is_available", _CUDA_IS_AVAILABLE)
    if _VISIBLE_DEVICES is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", _VISIBLE_DEVICES)


@contextlib.contextmanager
def sync_debug_error():
    """Inside, a CUDA operation that makes the host wait for the GPU raises a RuntimeError."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


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
