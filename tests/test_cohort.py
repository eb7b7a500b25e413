"""predict.py on folders of many photographs: bad files and blank photographs are failures of their own, EXIF
orientation, a killed run resumed, two torchrun processes sharing a folder, and masks as predict.py always
drew them (the library's steps written out here)."""
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, run_script
from tests.test_predict import spread_unet
from train_utils.cohort import Progress, RowLog, read_rows, share
from train_utils.errors import UserError
from train_utils.imaging import estimate_fov, fov_scale, read_image
from train_utils.inference import inference_model, predict_probabilities, probabilities_at
from train_utils.measurements import MeasurementsFile
from train_utils.synthetic import synthetic_fundus
from train_utils.transforms import DRIVE_MEAN, DRIVE_STD, rescale

H, W = 96, 90


def checkpoint(path, fov_diameter=None):
    """A tiny U-Net checkpoint in train.py's format, optionally trained at an FOV scale (as the shipped model)."""
    model = spread_unet(2)
    args = {"model": "unet", "num_classes": 1, "base_c": 8, "mean": list(DRIVE_MEAN), "std": list(DRIVE_STD)}
    if fov_diameter:
        args["fov_diameter"] = fov_diameter
    torch.save({"model": model.state_dict(), "args": args, "epoch": 0}, path)
    return str(path)


def photographs(folder, count, size=(H, W), first_seed=0):
    os.makedirs(folder, exist_ok=True)
    for k in range(count):
        img, _, _ = synthetic_fundus(*size, seed=first_seed + k)
        Image.fromarray(img).save(os.path.join(folder, f"p{k:02d}.png"))
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    return {"plain": checkpoint(root / "plain.pth"), "scaled": checkpoint(root / "scaled.pth", fov_diameter=60)}


def outputs_of(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".png"))


def test_bad_files_and_blank_photographs_fail_alone(weights, tmp_path):
    photos = photographs(tmp_path / "in", 3)
    (tmp_path / "in" / "a_text.png").write_text("not a picture")
    truncated = tmp_path / "in" / "b_truncated.jpg"
    Image.open(os.path.join(photos, "p00.png")).convert("RGB").save(truncated, quality=90)
    truncated.write_bytes(truncated.read_bytes()[:300])
    Image.new("RGB", (W, H), (255, 255, 255)).save(tmp_path / "in" / "c_white.png")
    Image.new("RGB", (W, H), (0, 0, 0)).save(tmp_path / "in" / "d_black.png")
    out = tmp_path / "out"
    r = run_script("predict.py", "--weights", weights["scaled"], "--img", photos, "--output-dir", out,
                   "--device", "cpu")
    assert r.returncode == 1
    failed = [ln for ln in r.stderr.splitlines() if ln.startswith("failed: ")]
    assert len(failed) == 4 and all(str(tmp_path / "in") in ln for ln in failed), r.stderr
    assert "cannot decode" in " ".join(failed) and "no field of view" in " ".join(failed)
    assert r.stderr.strip().splitlines()[-1].startswith("error: 4 of 7 photographs failed")
    assert outputs_of(out) == ["p00.png", "p01.png", "p02.png"]  # every good photograph after the bad ones too
    rows = read_rows(out / "failures.csv", ("image", "error"))
    assert sorted(row["image"] for row in rows) == ["a_text.png", "b_truncated.jpg", "c_white.png", "d_black.png"]

    # Once the bad files are gone, the same command finishes the folder: nothing is predicted twice, and the
    # failures are gone from the list.
    for name in ("a_text.png", "b_truncated.jpg", "c_white.png", "d_black.png"):
        os.remove(tmp_path / "in" / name)
    r = run_script("predict.py", "--weights", weights["scaled"], "--img", photos, "--output-dir", out,
                   "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "3 of the 3 photographs are done already" in r.stdout and not (out / "failures.csv").exists()


def test_one_bad_photograph_alone_is_one_error_line(weights, tmp_path):
    (tmp_path / "x.png").write_text("not a picture")
    r = run_script("predict.py", "--weights", weights["plain"], "--img", tmp_path / "x.png", "--output-dir",
                   tmp_path / "out", "--device", "cpu")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: cannot decode image"), r.stderr


def test_exif_orientation_is_applied(weights, tmp_path):
    img, _, _ = synthetic_fundus(H, W, seed=3)
    upright = Image.fromarray(img)
    upright.save(tmp_path / "upright.jpg", quality=95)
    # Stored as the sensor read it (turned 90 degrees), tagged to be turned back for display: orientation 6.
    stored = Image.open(tmp_path / "upright.jpg").transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "tagged.jpg", quality=95, exif=exif)
    shown = np.array(Image.open(tmp_path / "tagged.jpg").transpose(Image.Transpose.ROTATE_270))
    Image.fromarray(shown).save(tmp_path / "shown.png")  # what a viewer displays, as untagged pixels
    for name in ("tagged.jpg", "shown.png"):
        r = run_script("predict.py", "--weights", weights["plain"], "--img", tmp_path / name, "--output-dir",
                       tmp_path / "out", "--device", "cpu", "--overlay")
        assert r.returncode == 0, r.stderr
    tagged, plain = (np.array(Image.open(tmp_path / "out" / f"{n}.png")) for n in ("tagged", "shown"))
    # Stored 90 x 96, shown 96 x 90: the mask is the shown photograph's, pixel for pixel.
    assert tagged.shape == (H, W) and np.array_equal(tagged, plain)
    assert Image.open(tmp_path / "out" / "tagged_overlay.png").size == (W, H)


def mask_as_predict_draws_it(model, path, fov_diameter):
    """The mask and probability map of one photograph, by the library's steps: the FOV estimated from its dark
    border, the photograph brought to the model's FOV scale, the probabilities back at its own size, the
    foreground where it is the most likely class inside the FOV."""
    image = read_image(path, "RGB")
    fov, _ = estimate_fov(image)
    work = torch.from_numpy(image).permute(2, 0, 1)
    if fov_diameter:
        work, _ = rescale(work, fov_scale(fov, fov_diameter))
    probs, _ = predict_probabilities(inference_model(model), work[None], DRIVE_MEAN, DRIVE_STD, tile_size=1024,
                                     channels_last=True)
    probs = probabilities_at(probs, image.shape[:2])[0]
    inside = torch.from_numpy(fov)
    mask = torch.where(inside, probs.argmax(0), 0).numpy().astype(np.uint8) * 255
    prob = torch.where(inside, 1 - probs[0], 0).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    return mask, prob


@pytest.mark.parametrize("kind", ["plain", "scaled"])
def test_masks_are_the_ones_predict_always_drew(weights, tmp_path, kind):
    photos = photographs(tmp_path / "in", 3, size=(H + 10, W), first_seed=5)
    model = spread_unet(2)
    expected = {f"p{k:02d}": mask_as_predict_draws_it(model, os.path.join(photos, f"p{k:02d}.png"),
                                                       60 if kind == "scaled" else None) for k in range(3)}
    for flags in (["--workers", "0"], ["--workers", "2"], ["-b", "2"]):
        out = tmp_path / "-".join(flags)
        r = run_script("predict.py", "--weights", weights[kind], "--img", photos, "--output-dir", out, "--device",
                       "cpu", "--save-prob", *flags)
        assert r.returncode == 0, r.stderr
        for stem, (mask, prob) in expected.items():
            assert np.array_equal(np.array(Image.open(out / f"{stem}.png")), mask), (flags, stem)
            assert np.array_equal(np.array(Image.open(out / f"{stem}_prob.png")), prob), (flags, stem)


def test_a_killed_run_resumes_where_it_stopped(weights, tmp_path):
    photos = photographs(tmp_path / "in", 12)
    (tmp_path / "in" / "zz_bad.png").write_text("not a picture")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(ROOT, "predict.py"), "--weights", weights["plain"], "--img", photos,
           "--output-dir", str(out), "--device", "cpu", "--overlay", "--measure"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    done_lines = 0
    for line in proc.stdout:
        done_lines += " -> " in line
        if done_lines == 3:
            proc.send_signal(signal.SIGKILL)  # mid-run, as a lost machine or a scheduler's limit would
            break
    proc.wait(timeout=60)
    first = set(outputs_of(out))
    assert 6 <= len(first) < 26 and not [n for n in os.listdir(out) if ".tmp" in n]
    for name in first:  # whatever the killed run left is whole
        Image.open(out / name).load()
    r = run_script("predict.py", *cmd[2:])
    assert r.returncode == 1 and "1 of 13 photographs failed" in r.stderr
    skipped = int(re.search(r"(\d+) of the 13 photographs are done already", r.stdout).group(1))
    assert skipped >= 3
    redone = [ln for ln in r.stdout.splitlines() if " -> " in ln]
    assert len(redone) == 12 - skipped  # each photograph once, over the two runs
    assert outputs_of(out) == sorted([f"p{k:02d}.png" for k in range(12)] + [f"p{k:02d}_overlay.png" for k in range(12)])
    assert [row["image"] for row in read_rows(out / "failures.csv", ("image", "error"))] == ["zz_bad.png"]
    # Every row the killed run wrote is kept, and each photograph has one.
    assert sorted(MeasurementsFile(str(out / "measurements.csv")).read()) == [f"p{k:02d}" for k in range(12)]
    with open(out / "measurements.csv") as f:
        assert len(f.read().splitlines()) == 1 + 12
    # Another model in the same folder predicts everything again, rather than keeping the first model's masks.
    r = run_script("predict.py", cmd[2], weights["scaled"], *cmd[4:])
    assert "every photograph is predicted again" in r.stdout and "done already" not in r.stdout


def test_two_torchrun_processes_share_a_folder(weights, tmp_path):
    photos = photographs(tmp_path / "in", 7)
    (tmp_path / "in" / "bad.png").write_text("not a picture")
    out = tmp_path / "out"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                os.path.join(ROOT, "predict.py")]
    r = run_script(torchrun, "--weights", weights["scaled"], "--img", photos, "--output-dir", out, "--device", "cpu",
                   "--measure", timeout=240)
    assert r.returncode == 1, r.stderr  # the bad file: the run's failure count, and no process crashed
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if re.match(r"rank [01]: ", ln)]
    per_photo = {}
    for ln in lines:
        name = re.search(r"in/([^:]+):", ln).group(1)
        per_photo.setdefault(name, []).append(ln[:6])
    assert sorted(per_photo) == ["bad.png"] + [f"p{k:02d}.png" for k in range(7)]
    assert all(len(ranks) == 1 for ranks in per_photo.values()), per_photo  # each photograph exactly once
    assert {ranks[0] for ranks in per_photo.values()} == {"rank 0", "rank 1"}  # both took a share
    assert outputs_of(out) == [f"p{k:02d}.png" for k in range(7)]
    assert [row["image"] for row in read_rows(out / "failures.csv", ("image", "error"))] == ["bad.png"]
    assert not [n for n in os.listdir(out) if ".part" in n]  # the processes' rows merged into one file each
    assert sorted(MeasurementsFile(str(out / "measurements.csv")).read()) == [f"p{k:02d}" for k in range(7)]
    assert "error" in r.stderr and "1 of 8 photographs failed" in r.stderr
    # No process crashed on its way out (torchrun's SIGTERM to the others, once one has exited 1, is its way).
    assert "terminate called" not in r.stderr and "SIGABRT" not in r.stderr and "SIGSEGV" not in r.stderr
    # Without the bad file the same command exits 0 and redoes nothing, whichever process did what.
    os.remove(tmp_path / "in" / "bad.png")
    r = run_script(torchrun, "--weights", weights["scaled"], "--img", photos, "--output-dir", out, "--device", "cpu",
                   "--measure", timeout=240)
    assert r.returncode == 0, r.stderr
    assert re.findall(r"(\d+) of the \d+ photographs are done already", r.stdout + r.stderr) in (["4"], ["4", "3"],
                                                                                              ["3", "4"])
    assert not re.search(r"rank [01]: .* -> ", r.stdout + r.stderr)


def test_row_log_writes_whole_rows_and_merges_parts(tmp_path):
    path = tmp_path / "rows.csv"
    log = RowLog(str(path), ("image", "value"))
    log.append({"image": "a.png", "value": "1"})
    log.append({"image": "b, with a comma.png", "value": "2"})
    with open(path, "a") as f:
        f.write("c.png,3")  # a row a crash cut short
    assert list(log.read()) == ["a.png", "b, with a comma.png"]
    for rank in (0, 1):
        RowLog(str(path), ("image", "value"), rank=rank).append({"image": f"r{rank}.png", "value": str(rank)})
    assert list(log.read()) == ["a.png", "b, with a comma.png", "r0.png", "r1.png"]
    log.merge()
    assert sorted(os.listdir(tmp_path)) == ["rows.csv"]
    assert [r["image"] for r in read_rows(path, ("image", "value"))] == ["a.png", "b, with a comma.png", "r0.png",
                                                                         "r1.png"]
    with pytest.raises(UserError, match=r"not a rows.csv of these columns \(it has image,value\)"):
        RowLog(str(path), ("image", "other")).read()
    assert share(list(range(7)), 1, 3) == [1, 4]
    assert Progress(4).step().startswith("[1/4, ")
