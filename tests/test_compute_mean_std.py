"""compute_mean_std against numpy on the concatenated FOV pixels, and its command line."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from compute_mean_std import compute_mean_std  # noqa: E402
from train_utils.synthetic import write_synthetic_drive  # noqa: E402

SPLITS = {"training": 3, "test": 1}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(write_synthetic_drive(str(tmp_path_factory.mktemp("drive")), num_train=3, num_test=1,
                                     height=64, width=60))


def fov_pixels(root, split):
    """Per image, the [n, 3] FOV pixels in [0, 1], read independently of the module under test."""
    d = os.path.join(root, "DRIVE", split)
    out = []
    for name in sorted(os.listdir(os.path.join(d, "images"))):
        number = name.split("_")[0]
        img = np.asarray(Image.open(os.path.join(d, "images", name)).convert("RGB"), dtype=np.float64) / 255.0
        fov = np.asarray(Image.open(os.path.join(d, "mask", f"{number}_{split}_mask.gif")).convert("L")) == 255
        out.append(img[fov])
    return out


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_matches_numpy(root, split):
    per_image = fov_pixels(root, split)
    assert len(per_image) == SPLITS[split]
    pooled = np.concatenate(per_image)
    r = compute_mean_std(root, split)
    assert r["num_images"] == SPLITS[split]
    assert r["num_pixels"] == pooled.shape[0] > 0
    np.testing.assert_allclose(r["mean"], pooled.mean(axis=0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(r["std"], pooled.std(axis=0, ddof=0), rtol=0, atol=1e-9)

    # The original script: mean of per-image means and of per-image stds.
    cum_mean = np.zeros(3)
    cum_std = np.zeros(3)
    for px in per_image:
        cum_mean += px.mean(axis=0)
        cum_std += px.std(axis=0)
    np.testing.assert_allclose(r["image_avg_mean"], cum_mean / len(per_image), rtol=0, atol=1e-9)
    np.testing.assert_allclose(r["image_avg_std"], cum_std / len(per_image), rtol=0, atol=1e-9)


def test_pooled_differs_from_image_average(root):
    # With several images the two definitions really differ: the test above checks them separately.
    r = compute_mean_std(root, "training")
    assert np.max(np.abs(np.subtract(r["std"], r["image_avg_std"]))) > 1e-6


def run_cli(*args):
    return subprocess.run([sys.executable, "compute_mean_std.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_prints_paste_line(root):
    p = run_cli("--data-path", root)
    assert p.returncode == 0, p.stderr
    r = compute_mean_std(root, "training")
    lines = p.stdout.splitlines()
    expected = ("--mean " + " ".join(f"{v:.4f}" for v in r["mean"])
                + " --std " + " ".join(f"{v:.4f}" for v in r["std"]))
    assert expected in lines
    assert re.fullmatch(r"--mean( \d\.\d{4}){3} --std( \d\.\d{4}){3}", lines[-1])
    assert f"images: {r['num_images']}, FOV pixels: {r['num_pixels']}" in p.stdout


def test_cli_missing_drive_folder(tmp_path):
    p = run_cli("--data-path", str(tmp_path / "nowhere"))
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), p.stderr
    assert "DRIVE" in err[0]
    assert "Traceback" not in p.stderr and p.stdout == ""
