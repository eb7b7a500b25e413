"""Arteries and veins: the label files (class indices and colours), the A/V datasets, the artery/vein scores
against a loop, a vessel model grown into an artery/vein one, training and --test-only through train.py,
predict.py --av and measure.py --av."""
import csv
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import train
from my_dataset import VesselDataset, dataset_files
from src import build_model
from tests.conftest import TINY_TRAIN, run_script
from tests.test_predict import spread_unet, write_checkpoint
from train_utils.checkpoint import init_weights
from train_utils.dice_coefficient_loss import build_target, dice_loss
from train_utils.errors import UserError
from train_utils.imaging import IGNORE_INDEX, VESSEL_ANY, palette_image, read_av_label
from train_utils.measurements import AV_COLUMNS, AV_MEASURED, measure, measure_av
from train_utils.metrics import ArteryVeinMetrics
from train_utils.synthetic import synthetic_fundus, write_synthetic
from train_utils.train_and_eval import criterion

H, W = 64, 60
COLOURS = {0: (0, 0, 0), 1: (255, 0, 0), 2: (0, 0, 255), 3: (255, 255, 255)}


@pytest.fixture(scope="module")
def av_root(tmp_path_factory):
    """A synthetic DRIVE with artery/vein labels in RITE's colours, and each image's classes (3: a crossing)."""
    root = str(tmp_path_factory.mktemp("drive_av"))
    write_synthetic(root, "drive_av", num_train=4, num_test=2, height=H, width=W, seed=3)
    labels = {}
    for split, numbers in (("training", range(21, 25)), ("test", range(1, 3))):
        for number in numbers:
            labels[f"{number:02d}_{split}"] = synthetic_fundus(H, W, seed=[3, number], with_av=True)[-1]
    return root, labels


# ---------------------------------------------------------------------------
# label files


def test_index_palette_and_colour_labels_read_alike(tmp_path):
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 4, (20, 30)).astype(np.uint8)
    Image.fromarray(classes).save(tmp_path / "index.png")
    palette_image(classes, [COLOURS[c] for c in range(4)]).save(tmp_path / "palette.png")
    rgb = np.zeros((20, 30, 3), np.uint8)
    for c, colour in COLOURS.items():
        rgb[classes == c] = colour
    crossing = (classes == 3) & (rng.random(classes.shape) < 0.5)
    rgb[crossing] = (0, 255, 0)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    rgb_soft = np.where(rgb > 0, 230, 20).astype(np.uint8)  # a JPEG-like drawing: channels off their extremes
    Image.fromarray(rgb_soft).save(tmp_path / "soft.png")
    for name in ("index.png", "palette.png", "colour.png", "soft.png"):
        got = read_av_label(str(tmp_path / name), "photo.tif", (20, 30))
        assert np.array_equal(got, classes), name


@pytest.mark.parametrize("picture, found", [
    (np.full((20, 30), 5, np.uint8), "the values 5"),
    (np.dstack([np.full((20, 30), 255, np.uint8), np.full((20, 30), 255, np.uint8), np.zeros((20, 30), np.uint8)]),
     "the colours (255, 255, 0)"),
])
def test_a_label_of_other_values_or_colours_is_one_error_naming_them(tmp_path, picture, found):
    path = tmp_path / "bad.png"
    Image.fromarray(picture).save(path)
    with pytest.raises(UserError, match=re.escape(f"label '{path}' holds {found}:") + ".*red artery, blue vein"):
        read_av_label(str(path), "photo.tif", (20, 30))


def test_a_label_of_another_size_is_one_error(tmp_path):
    Image.fromarray(np.zeros((20, 31), np.uint8)).save(tmp_path / "wide.png")
    with pytest.raises(UserError, match="is 31x20 but its image 'photo.tif' is 30x20"):
        read_av_label(str(tmp_path / "wide.png"), "photo.tif", (20, 30))


# ---------------------------------------------------------------------------
# datasets


def test_drive_av_reads_rite_colours_and_ignores_crossings(av_root):
    root, labels = av_root
    for split in ("training", "test"):
        samples = dataset_files("drive_av", root, split)
        data = VesselDataset(samples, num_classes=2, av=True, fov="masks")
        for k, sample in enumerate(samples):
            target = data[k][1].numpy()
            classes = labels[os.path.basename(sample.image).rsplit(".", 1)[0]]
            with Image.open(sample.mask) as im:
                inside = np.array(im.convert("L")) >= 128
            expected = np.where(inside & (classes != 3), classes, IGNORE_INDEX)
            assert np.array_equal(target, expected)
            assert (target == 1).any() and (target == 2).any()


def test_missing_av_label_and_wrong_class_count_are_one_error(av_root, tmp_path):
    root, _ = av_root
    copy = str(tmp_path / "copy")
    shutil.copytree(root, copy)
    os.remove(os.path.join(copy, "DRIVE", "test", "av", "01_test.png"))
    with pytest.raises(UserError, match=r"artery/vein label file '.*01_test.png' for image '01_test.tif'"):
        dataset_files("drive_av", copy, "test")
    with pytest.raises(UserError, match="artery/vein labels need --num-classes 2"):
        VesselDataset(dataset_files("drive_av", root, "test"), num_classes=1, av=True)


def test_hrf_av_layout(tmp_path):
    root = tmp_path / "hrf"
    for sub in ("images", "mask", "av"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(1)
    for number, kind in (("01", "h"), ("07", "dr")):
        stem = f"{number}_{kind}"
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / "images" / f"{stem}.jpg")
        Image.fromarray(np.full((20, 30), 255, np.uint8)).save(root / "mask" / f"{stem}_mask.tif")
        Image.fromarray(rng.integers(0, 4, (20, 30)).astype(np.uint8)).save(root / "av" / f"{stem}.png")
    (train_sample,) = dataset_files("hrf_av", str(root), "training")
    (test_sample,) = dataset_files("hrf_av", str(root), "test")
    assert os.path.basename(train_sample.label) == "01_h.png" and os.path.basename(test_sample.label) == "07_dr.png"
    assert train_sample.mask.endswith("01_h_mask.tif")


# ---------------------------------------------------------------------------
# the scores


def test_artery_vein_scores_against_a_loop():
    rng = np.random.default_rng(2)
    logits = torch.from_numpy(rng.normal(size=(3, 3, 17, 19)).astype(np.float32))
    target = torch.from_numpy(rng.choice([0, 1, 2, IGNORE_INDEX], size=(3, 17, 19), p=[0.5, 0.2, 0.2, 0.1]))
    metrics = ArteryVeinMetrics()
    metrics.update(logits[:2], target[:2])
    metrics.update(logits[2:], target[2:])
    got = metrics.compute()
    pred = logits.argmax(1).numpy().ravel()
    t = target.numpy().ravel()
    counts = {}
    right = scored = 0
    for p, label in zip(pred, t):
        if label == IGNORE_INDEX:
            continue
        for cls in (1, 2):
            key = (cls, "tp" if p == cls and label == cls else "fp" if p == cls else "fn" if label == cls else "tn")
            counts[key] = counts.get(key, 0) + 1
        if label in (1, 2) and p in (1, 2):
            scored += 1
            right += p == label
    for cls, name in ((1, "artery_f1"), (2, "vein_f1")):
        tp, fp, fn = (counts.get((cls, k), 0) for k in ("tp", "fp", "fn"))
        assert got[name] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
    assert got["av_accuracy"] == pytest.approx(right / scored, abs=1e-12)
    assert 0.2 < got["av_accuracy"] < 0.8  # random logits: the check has something to find


def test_a_vessel_model_grows_into_an_artery_vein_model(tmp_path):
    vessel_model = spread_unet(2)
    path = write_checkpoint(tmp_path / "vessels.pth", vessel_model, 1)
    av_model = spread_unet(3, seed=5)
    line = init_weights(av_model, path)
    assert "copied to each of 2 classes" in line
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        two, three = vessel_model.eval()(x)["out"], av_model.eval()(x)["out"]
    assert torch.equal(three[:, 0], two[:, 0]) and torch.equal(three[:, 1], two[:, 1])
    assert torch.equal(three[:, 2], two[:, 1])
    assert torch.equal(three.argmax(1) != 0, two.argmax(1) != 0)  # the same vessels, before any training
    with pytest.raises(UserError, match="does not fit the model"):  # another width
        init_weights(build_model("unet", num_classes=3, base_c=4), path)


# ---------------------------------------------------------------------------
# train.py, predict.py, measure.py


def test_train_and_test_only_report_artery_and_vein_scores(av_root, tmp_path, capsys):
    root, _ = av_root
    out = tmp_path / "run"
    train.main(train.get_args_parser().parse_args(
        ["--dataset", "drive_av", "--data-path", root, "--epochs", "1", "--output-dir", str(out), "--no-plots"]
        + TINY_TRAIN))
    printed = capsys.readouterr().out
    assert "num_classes=2 (dataset)" in printed
    for name in ("artery_f1", "vein_f1", "av_accuracy"):
        assert f"{name}: " in printed
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert {"artery_f1", "vein_f1", "av_accuracy", "f1", "cldice"} <= set(record)
    train.main(train.get_args_parser().parse_args(
        ["--dataset", "drive_av", "--data-path", root, "--test-only", "--weights", str(out / "checkpoint.pth"),
         "--output-dir", str(out)] + TINY_TRAIN))
    with open(out / "test_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == ["01_test.tif", "02_test.tif", "pooled"]
    assert float(rows[-1]["av_accuracy"]) == pytest.approx(record["av_accuracy"], abs=1e-6)


def test_vessel_only_datasets_train_beside_artery_vein_ones_and_are_not_scored(av_root, tmp_path, capsys):
    root, _ = av_root
    vessels = str(tmp_path / "vessels")
    write_synthetic(vessels, "chase_db1", num_train=4, num_test=2, height=H, width=W, seed=4)
    out = tmp_path / "run"
    train.main(train.get_args_parser().parse_args(
        ["--dataset", "drive_av", "chase_db1", "--data-path", root, vessels, "--epochs", "1", "--output-dir",
         str(out), "--no-plots"] + TINY_TRAIN))
    printed = capsys.readouterr().out
    assert "chase_db1: training only: its vessel labels supervise artery and vein together" in printed
    assert "training draws equally from drive_av (4 images), chase_db1 (4 images)" in printed
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert "artery_f1" in record and "datasets" not in record  # validated on drive_av alone


def test_a_vessel_of_either_class_is_supervised_as_not_background():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 9, 11)
    target = torch.randint(0, 3, (2, 9, 11))
    target[0, :2] = IGNORE_INDEX
    plain = criterion({"out": logits}, target, None, 3, True, IGNORE_INDEX)
    tutorial = (torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
                + dice_loss(logits, build_target(target, 3, IGNORE_INDEX), multiclass=True,
                            ignore_index=IGNORE_INDEX))
    assert plain.item() == pytest.approx(tutorial.item(), abs=1e-6)  # no such pixel: the tutorial's value
    mixed = target.clone()
    mixed[1, 4:] = torch.where(target[1, 4:] != 0, VESSEL_ANY, 0)
    got = criterion({"out": logits}, mixed, None, 3, False, IGNORE_INDEX)
    total, count = 0.0, 0
    probs = logits.softmax(1)
    for n, y, x in np.ndindex(*mixed.shape):
        label = int(mixed[n, y, x])
        if label == IGNORE_INDEX:
            continue
        p = probs[n, :, y, x]
        total += -math.log(1 - p[0].item()) if label == VESSEL_ANY else -math.log(p[label].item())
        count += 1
    assert got.item() == pytest.approx(total / count, rel=1e-5)
    assert (mixed == VESSEL_ANY).sum() > 5  # the check has such pixels to weigh


@pytest.fixture(scope="module")
def av_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("av_model")
    return write_checkpoint(root / "av.pth", spread_unet(3, seed=1), 2), write_checkpoint(
        root / "vessels.pth", spread_unet(2), 1)


def test_predict_av_writes_the_class_map_probabilities_overlay_and_measurements(av_root, av_weights, tmp_path):
    root, _ = av_root
    images, masks = os.path.join(root, "DRIVE", "test", "images"), os.path.join(root, "DRIVE", "test", "mask")
    out = tmp_path / "out"
    r = run_script("predict.py", "--av", "--weights", av_weights[0], "--img", images, "--roi-mask", masks,
                   "--output-dir", out, "--save-prob", "--overlay", "--measure", "--threshold", "0.6")
    assert r.returncode == 0, r.stderr
    written = set(os.listdir(out)) - {"predict_run.json"}  # the run record that lets a folder run resume
    assert written == {"measurements.csv"} | {f"{stem}{suffix}.png" for stem in ("01_test", "02_test") for suffix in
                                              ("", "_prob", "_overlay", "_av", "_artery_prob", "_vein_prob")}
    for stem in ("01_test", "02_test"):
        with Image.open(out / f"{stem}_av.png") as im:
            assert im.mode == "P"
            palette = im.getpalette()[:9]
            av = np.array(im)
        assert palette == [0, 0, 0, 255, 0, 0, 0, 0, 255]  # black, red artery, blue vein
        mask = np.array(Image.open(out / f"{stem}.png"))
        vessel = np.array(Image.open(out / f"{stem}_prob.png")).astype(int)
        artery = np.array(Image.open(out / f"{stem}_artery_prob.png")).astype(int)
        vein = np.array(Image.open(out / f"{stem}_vein_prob.png")).astype(int)
        assert set(np.unique(av)) == {0, 1, 2}
        assert np.array_equal(mask == 255, av != 0)
        assert np.abs(artery + vein - vessel).max() <= 2  # P(artery) + P(vein) = 1 - P(background), rounded
        on = av != 0
        assert (vessel[on] > 0.6 * 255 - 1).all() and (vessel[~on] < 0.6 * 255 + 1).all()
        assert (artery[av == 1] >= vein[av == 1]).all() and (vein[av == 2] >= artery[av == 2]).all()
    r = run_script("predict.py", "--av", "--weights", av_weights[0], "--img", images, "--roi-mask", masks,
                   "--output-dir", tmp_path / "plain", "--overlay", "--threshold", "0.6")  # no skeleton drawn
    assert r.returncode == 0, r.stderr
    for stem in ("01_test", "02_test"):
        av = np.array(Image.open(out / f"{stem}_av.png"))
        overlay = np.array(Image.open(tmp_path / "plain" / f"{stem}_overlay.png")).astype(float)
        photo = np.array(Image.open(os.path.join(images, f"{stem}.tif")).convert("RGB")).astype(float)
        expected = photo.copy()
        for cls, colour in ((1, (255, 0, 0)), (2, (0, 0, 255))):  # arteries red, veins blue, blended
            expected[av == cls] = 0.4 * photo[av == cls] + 0.6 * np.array(colour)
        assert np.abs(overlay - np.rint(expected)).max() <= 1
    with open(out / "measurements.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == AV_COLUMNS and [r["image"] for r in rows] == ["01_test", "02_test"]
    assert all(float(r["artery_vessel_area_density"]) > 0 and float(r["vein_vessel_area_density"]) > 0 for r in rows)
    assert all(r["calibre_qc"] and r["disc_found_by"].startswith("photograph") for r in rows)
    # measure.py --av on predict.py's folder takes its <stem>_av.png maps and, the disc found in the same
    # photographs, writes the same rows
    r = run_script("measure.py", "--av", "--masks", out, "--roi-mask", masks, "--img", images,
                   "--output-dir", tmp_path / "again")
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "again" / "measurements.csv") as f:
        assert list(csv.DictReader(f)) == rows


def test_predict_av_needs_an_artery_vein_model(av_root, av_weights, tmp_path):
    root, _ = av_root
    r = run_script("predict.py", "--av", "--weights", av_weights[1], "--img",
                   os.path.join(root, "DRIVE", "test", "images", "01_test.tif"), "--output-dir", tmp_path / "o")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("error: --av needs an artery/vein model")


def test_measure_av_on_labels_measures_each_class_as_its_own_mask(av_root, tmp_path):
    root, labels = av_root
    masks = os.path.join(root, "DRIVE", "test", "mask")
    r = run_script("measure.py", "--av", "--masks", os.path.join(root, "DRIVE", "test", "av"), "--roi-mask", masks,
                   "--output-dir", tmp_path / "m", "--measure-diameter", "0")
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "m" / "measurements.csv") as f:
        rows = {r["image"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["01_test", "02_test"]
    classes = labels["01_test"]
    with Image.open(os.path.join(masks, "01_test_mask.gif")) as im:
        fov = np.array(im.convert("L")) >= 128
    whole = measure(classes != 0, fov, "01_test", diameter_to=0).row
    row = measure_av(classes, fov, "01_test", diameter_to=0).row
    for prefix, cls in (("artery_", 1), ("vein_", 2)):
        alone = measure(classes == cls, fov, "01_test", diameter_to=0).row
        for name in AV_MEASURED:
            assert row[prefix + name] == alone[name] or (alone[name] is None and row[prefix + name] is None) \
                or (np.isnan(alone[name]) and np.isnan(row[prefix + name]))
            written = rows["01_test"][prefix + name]
            assert (written == "" and (alone[name] is None or np.isnan(alone[name]))) or \
                float(written) == pytest.approx(alone[name], rel=1e-5)
    assert float(rows["01_test"]["vessel_area_density"]) == pytest.approx(whole["vessel_area_density"], rel=1e-5)


def test_an_exported_artery_vein_model_draws_the_same_map(av_root, av_weights, tmp_path):
    pytest.importorskip("onnx", reason="the ONNX export needs the optional extras")
    pytest.importorskip("onnxruntime", reason="the ONNX export needs the optional extras")
    root, _ = av_root
    photo = os.path.join(root, "DRIVE", "test", "images", "01_test.tif")
    r = run_script("export.py", "--weights", av_weights[0], "--format", "onnx", "--output", tmp_path / "av.onnx",
                   "--threshold", "0.6")
    assert r.returncode == 0, r.stderr
    for weights, out in ((tmp_path / "av.onnx", "onnx"), (av_weights[0], "pth")):
        r = run_script("predict.py", "--av", "--weights", weights, "--img", photo, "--output-dir", tmp_path / out,
                       "--threshold", "0.6")
        assert r.returncode == 0, r.stderr
    onnx_map = np.array(Image.open(tmp_path / "onnx" / "01_test_av.png"))
    pth_map = np.array(Image.open(tmp_path / "pth" / "01_test_av.png"))
    assert (onnx_map != pth_map).mean() < 0.002 and set(np.unique(onnx_map)) == {0, 1, 2}


def test_predict_av_without_weights_takes_the_shipped_artery_vein_model(av_root, tmp_path):
    root, _ = av_root
    r = run_script("predict.py", "--av", "--img", os.path.join(root, "DRIVE", "test", "images", "01_test.tif"),
                   "--output-dir", tmp_path / "o")  # even where save_weights/ holds a vessel model of one's own
    assert r.returncode == 0, r.stderr
    assert "using the shipped artery/vein model 'weights/unet_av.pth'" in r.stdout
    assert os.path.isfile(tmp_path / "o" / "01_test_av.png")
