"""The GPU path end to end, and the rule that keeps every other test off the GPU.

The tests marked ``cuda`` check that train.py trains and validates on CUDA as the CPU scores the same weights,
with and without float16 AMP, and that predict.py on CUDA draws the CPU's masks; ``pytest -m cuda`` runs just
them (and the sync-free metric and loss updates, tested beside their CPU tests) on a machine with a GPU, and
elsewhere they skip. Every other test sees a machine without CUDA, as CI's is (conftest.py).
"""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY_TRAIN, run_script

ON_CUDA = [("cuda" if a == "cpu" else a) for a in TINY_TRAIN]


def last_record(out):
    with open(out / "log.jsonl") as f:
        return [json.loads(line) for line in f][-1]


def test_a_test_not_marked_cuda_and_its_scripts_see_no_gpu(drive_root, tmp_path):
    assert torch.cuda.is_available() is False
    r = run_script([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"])
    assert r.returncode == 0 and r.stdout.split() == ["False"], r.stderr
    no_device = [a for a in TINY_TRAIN if a not in ("--device", "cpu")]
    r = run_script("train.py", "--data-path", drive_root, "--output-dir", tmp_path, "--epochs", 1, *no_device)
    assert r.returncode == 0 and "using cpu device" in r.stdout, r.stderr


@pytest.mark.cuda
def test_a_test_marked_cuda_sees_the_gpu():
    assert torch.cuda.is_available()
    r = run_script([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"])
    assert r.returncode == 0 and r.stdout.split() == ["True"], r.stderr


@pytest.mark.cuda
@pytest.mark.parametrize("amp", [[], ["--amp", "--amp-dtype", "float16"]], ids=["float32", "float16-amp"])
def test_train_on_cuda_and_the_cpu_scores_its_weights_alike(drive_root, tmp_path, amp):
    out = tmp_path / "run"
    r = run_script("train.py", "--data-path", drive_root, "--output-dir", out, "--epochs", 2, *ON_CUDA, *amp)
    assert r.returncode == 0, r.stderr
    assert "using cuda device" in r.stdout
    record = last_record(out)
    assert record["epoch"] == 1 and np.isfinite(record["train_loss"])
    # The CPU validates the last weights as CUDA did: the same pixels, up to a convolution's rounding.
    r = run_script("train.py", "--data-path", drive_root, "--test-only", "--resume", out / "checkpoint.pth",
                   "--output-dir", tmp_path / "cpu", *TINY_TRAIN)
    assert r.returncode == 0, r.stderr
    assert "using cpu device" in r.stdout
    cpu_dice = float(r.stdout.split("dice coefficient: ")[1].split()[0])
    assert cpu_dice == pytest.approx(record["dice"], abs=2e-3)


@pytest.mark.cuda
def test_predict_on_cuda_draws_the_cpus_masks(drive_root, tmp_path):
    out = tmp_path / "run"
    r = run_script("train.py", "--data-path", drive_root, "--output-dir", out, "--epochs", 1, *ON_CUDA)
    assert r.returncode == 0, r.stderr
    images = f"{drive_root}/DRIVE/test/images"
    written = {}
    for device in ("cuda", "cpu"):
        r = run_script("predict.py", "--weights", out / "checkpoint.pth", "--img", images, "--device", device,
                       "--output-dir", tmp_path / device, "--save-prob")
        assert r.returncode == 0, r.stderr
        written[device] = {p.name: np.array(Image.open(p)).astype(int) for p in sorted((tmp_path / device).iterdir())}
    assert written["cuda"].keys() == written["cpu"].keys() and len(written["cpu"]) == 6  # 3 masks, 3 maps
    for name, cpu in written["cpu"].items():
        cuda = written["cuda"][name]
        if name.endswith("_prob.png"):
            # 8-bit probabilities: a level or two is a convolution's rounding; another result differs by far more.
            assert np.abs(cpu - cuda).mean() <= 0.5 and np.abs(cpu - cuda).max() <= 8, name
        else:
            assert (cpu == cuda).mean() >= 0.995, name
