"""The dataset readers (CHASE_DB1, STARE, HRF, folder), labels and FOVs, --val-split and test_metrics.csv.

Every reader is tested on files the synthetic writer lays out as the
dataset's archive does; no test reads real data.
"""
import csv
import gzip
import math
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_TRAIN, run_script, spread_output
from tests.test_skeleton import loop_counts
from my_dataset import DATASETS, STARE_TRAIN_COUNT, VesselDataset, dataset_files, holdout
from train_utils.checkpoint import load_checkpoint
from train_utils.errors import UserError
from train_utils.imaging import (estimate_fov, field_of_view, files_by_stem, read_binary, read_image, read_label,
                                  split_ext)
from train_utils.inference import evaluation_log_probs, predict_probabilities
from train_utils.metrics import IGNORE_INDEX
from train_utils.skeleton import cldice
from train_utils.synthetic import WRITERS, synthetic_fundus, write_synthetic, write_synthetic_drive

SIZE = dict(height=64, width=60)


def names(samples):
    return [os.path.basename(s.image) for s in samples]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """One synthetic root per layout: chase_db1 6 + 4, stare 10 + 2 (+1 unlabelled), hrf 6 + 3, folder 4 + 2."""
    base = tmp_path_factory.mktemp("layouts")
    roots = {}
    for layout, n_train, n_test in (("chase_db1", 6, 4), ("stare", STARE_TRAIN_COUNT, 2), ("hrf", 6, 3),
                                    ("folder", 4, 2)):
        roots[layout] = write_synthetic(str(base / layout), layout, n_train, n_test, seed=2, **SIZE)
    roots["folder2"] = write_synthetic(str(base / "folder2"), "folder", 4, 2, seed=3, num_classes=2,
                                       masks=False, **SIZE)
    return roots


# ---------------------------------------------------------------------------
# readers


def test_chase_db1_split_label_and_no_masks(layouts):
    train = dataset_files("chase_db1", layouts["chase_db1"], "training")
    test = dataset_files("chase_db1", layouts["chase_db1"], "test")
    assert names(train) == ["Image_01L.jpg", "Image_01R.jpg", "Image_02L.jpg", "Image_02R.jpg",
                            "Image_03L.jpg", "Image_03R.jpg"]
    assert names(test) == ["Image_11L.jpg", "Image_11R.jpg", "Image_12L.jpg", "Image_12R.jpg"]
    assert all(s.label.endswith(split_ext(s.image)[0] + "_1stHO.png") and s.mask is None for s in train + test)


def test_stare_reads_gzip_skips_unlabelled_and_splits_after_ten(layouts, capsys):
    train = dataset_files("stare", layouts["stare"], "training")
    assert "1 STARE photograph without a vessel label skipped (im0013.ppm.gz)" in capsys.readouterr().out
    test = dataset_files("stare", layouts["stare"], "test")
    assert names(train) == [f"im{k:04d}.ppm.gz" for k in range(1, 11)]
    assert names(test) == ["im0011.ppm.gz", "im0012.ppm.gz"]
    assert all("labels-ah" in s.label and s.label.endswith(".ah.ppm.gz") for s in train + test)
    # The gzip-compressed PPM decodes to the photograph the writer drew.
    img, vessel, _ = synthetic_fundus(seed=[2, 300], **SIZE)
    assert np.array_equal(read_image(train[0].image, "RGB"), img)
    assert np.array_equal(read_label(train[0].label, train[0].image, vessel.shape), vessel.astype(np.uint8))


def test_hrf_split_both_jpeg_cases_and_masks(layouts):
    train = dataset_files("hrf", layouts["hrf"], "training")
    test = dataset_files("hrf", layouts["hrf"], "test")
    assert names(train) == ["01_dr.JPG", "01_g.jpg", "01_h.jpg", "02_dr.jpg", "02_g.JPG", "02_h.JPG"]
    assert names(test) == ["06_dr.JPG", "06_g.jpg", "06_h.jpg"]
    s = train[0]
    assert s.label.endswith(os.path.join("manual1", "01_dr.tif")) and s.mask.endswith("01_dr_mask.tif")


def test_folder_matches_stems_and_masks(layouts, tmp_path):
    train = dataset_files("folder", layouts["folder"], "training")
    assert names(train) == [f"sample{k:03d}.png" for k in range(1, 5)]
    assert all(s.mask.endswith(split_ext(os.path.basename(s.image))[0] + "_mask.png") for s in train)
    assert all(s.mask is None for s in dataset_files("folder", layouts["folder2"], "test"))
    # A photograph without its label is named in the error.
    root = write_synthetic(str(tmp_path / "f"), "folder", 2, 1, seed=0, **SIZE)
    os.remove(os.path.join(root, "training", "labels", "sample002.png"))
    with pytest.raises(UserError, match=r"no label for image '.*sample002.png'"):
        dataset_files("folder", root, "training")


def test_registry_lists_every_dataset_once(layouts, tmp_path):
    """One entry per dataset: its reader, its statistics and sizes; a synthetic writer for each."""
    assert list(DATASETS) == list(WRITERS) == ["drive", "chase_db1", "stare", "hrf", "folder", "drive_av", "hrf_av"]
    for name in ("chase_db1", "stare", "hrf", "folder"):
        assert dataset_files(name, layouts[name], "test") == DATASETS[name].reader(layouts[name], "test")
    assert DATASETS["drive"].base_size == 565 and DATASETS["hrf"].base_size is None
    assert DATASETS["chase_db1"].mean == (0.6413, 0.2336, 0.0404) and DATASETS["hrf"].std == DATASETS["drive"].std
    # Datasets with a mask file per image are those whose reader gives one.
    assert all(s.mask is not None for s in dataset_files("hrf", layouts["hrf"], "training"))
    assert all(s.mask is None for s in dataset_files("chase_db1", layouts["chase_db1"], "training"))
    assert [DATASETS[n].fov_masks for n in DATASETS] == [True, False, False, True, None, True, True]
    assert [n for n in DATASETS if DATASETS[n].av] == ["drive_av", "hrf_av"]
    with pytest.raises(UserError, match="unknown dataset 'voc' \\(choose from drive, chase_db1"):
        dataset_files("voc", str(tmp_path), "training")


def test_files_by_stem_lists_image_files_gif_first(tmp_path):
    for name in ("01_mask.png", "01_mask.gif", "01_mask.txt", "02.ppm.gz", "03.TIF"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "04.png").mkdir()  # a folder, not a file
    assert files_by_stem(str(tmp_path)) == {"01_mask": ["01_mask.gif", "01_mask.png"], "02": ["02.ppm.gz"],
                                            "03": ["03.TIF"]}
    assert files_by_stem(str(tmp_path / "nowhere")) == {}


def test_missing_layout_folders_are_one_clear_error(tmp_path):
    for name, pattern in (("stare", "stare-images"), ("hrf", "images"), ("folder", "training"),
                          ("chase_db1", "no CHASE_DB1 photographs")):
        with pytest.raises(UserError, match=pattern):
            dataset_files(name, str(tmp_path), "training")


@pytest.mark.parametrize("layout", ["chase_db1", "stare", "hrf", "folder"])
def test_targets_are_label_inside_the_fov(layouts, layout):
    """The target is the label inside the FOV (the mask, or the FOV estimated as predict.py does) and 255 outside."""
    samples = dataset_files(layout, layouts[layout], "training")[:2]
    ds = VesselDataset(samples)
    everything = VesselDataset(samples, fov="all")
    for k, s in enumerate(samples):
        img = read_image(s.image, "RGB")
        label = np.array(Image.open(s.label).convert("L")) >= 128 if not s.label.endswith(".gz") else \
            read_label(s.label, s.image, img.shape[:2]).astype(bool)
        if s.mask is not None:
            fov = np.array(Image.open(s.mask).convert("L")) >= 128
        else:
            fov = estimate_fov(img)[0]
            assert 0.5 < fov.mean() < 0.9  # the synthetic FOV is a disc covering ~70% of the image
        image, target = ds[k]
        assert torch.equal(image, torch.from_numpy(img).permute(2, 0, 1))
        t = target.numpy()
        assert np.array_equal(t == IGNORE_INDEX, ~fov)
        assert np.array_equal(t == 1, label & fov)
        t_all = everything[k][1].numpy()
        if s.mask is None:  # fov="all" changes only the datasets without masks
            assert not (t_all == IGNORE_INDEX).any() and np.array_equal(t_all == 1, label)
        else:
            assert np.array_equal(t_all, t)


# ---------------------------------------------------------------------------
# labels


def _save_gray(tmp_path, name, arr, mode=None):
    path = str(tmp_path / name)
    im = Image.fromarray(arr.astype(np.uint8))
    (im.convert(mode) if mode else im).save(path)
    return path


def test_binary_labels_in_every_encoding(tmp_path):
    rng = np.random.default_rng(0)
    vessel = rng.random((8, 9)) < 0.3
    shape = vessel.shape
    for name, arr, mode in (("a.png", vessel * 255, None), ("b.png", vessel * 1, None), ("c.png", vessel * 255, "1"),
                            ("d.ppm", vessel * 255, "RGB"), ("e.tif", vessel * 255, None)):
        path = _save_gray(tmp_path, name, arr, mode)
        assert np.array_equal(read_label(path, "img", shape), vessel.astype(np.uint8)), name
    # Grey interpolated edges split at 128; 0/1 with 255 keeps 255 as ignored.
    grey = np.where(vessel, 200, 60)
    assert np.array_equal(read_label(_save_gray(tmp_path, "f.png", grey), "img", shape), vessel)
    ignored = np.where(vessel, 1, 0)
    ignored[0] = 255
    out = read_label(_save_gray(tmp_path, "g.png", ignored), "img", shape)
    assert (out[0] == 255).all() and np.array_equal(out[1:], vessel[1:].astype(np.uint8))
    # gzip-compressed files read as the file inside.
    raw = open(_save_gray(tmp_path, "h.pgm", vessel * 255), "rb").read()
    with gzip.open(tmp_path / "h.pgm.gz", "wb") as f:
        f.write(raw)
    assert np.array_equal(read_label(str(tmp_path / "h.pgm.gz"), "img", shape), vessel)


def test_multiclass_labels_palette_or_index_and_their_errors(tmp_path):
    classes = np.array([[0, 1, 2, 255], [2, 2, 1, 0]], dtype=np.uint8)
    pal = Image.fromarray(classes).convert("P")
    pal.putpalette([v for c in range(256) for v in ((0, 0, 0) if c == 0 else (255, 0, 255 - c))])
    pal.save(tmp_path / "p.png")
    Image.fromarray(classes).save(tmp_path / "i.png")
    for name in ("p.png", "i.png"):
        assert np.array_equal(read_label(str(tmp_path / name), "img", classes.shape, num_classes=2), classes)
    # A colour palette means class indices whatever --num-classes says, so a class too many is caught.
    with pytest.raises(UserError, match=r"holds class 2, but --num-classes 1 allows 0..1"):
        read_label(str(tmp_path / "p.png"), "img", classes.shape, num_classes=1)
    Image.fromarray(np.stack([classes] * 2 + [classes * 0], axis=-1)).save(tmp_path / "rgb.png")
    with pytest.raises(UserError, match=r"label '.*rgb.png': a label must be a class-index .* not mode RGB"):
        read_label(str(tmp_path / "rgb.png"), "img", classes.shape, num_classes=2)
    with pytest.raises(UserError, match=r"is 4x2 but its image 'img' is 5x2"):
        read_label(str(tmp_path / "i.png"), "img", (2, 5), num_classes=2)


def test_colour_and_multi_valued_one_class_labels_are_refused(tmp_path):
    rng = np.random.default_rng(1)
    vessel = np.zeros((40, 44), dtype=bool)
    vessel[:, 10:13] = vessel[20:23, :] = True
    shape = vessel.shape
    colours = rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)
    Image.fromarray(colours).save(tmp_path / "colour.png")
    with pytest.raises(UserError, match=r"label '.*colour.png' is in colour \(\(\d+, \d+, \d+\), .*colours\)\): "
                                        r"with --num-classes 1 a label is grey"):
        read_label(str(tmp_path / "colour.png"), "img", shape)
    disc = np.zeros(shape, dtype=bool)
    disc[5:15, 25:35] = True
    for name, levels, found in (("indices", np.where(disc, 2, vessel), "0, 1, 2"),
                                ("indices_ignored", np.where(disc, 2, np.where(vessel, 1, 255)), "1, 2, 255"),
                                ("three_levels", np.where(disc, 128, vessel * 255), "0, 128, 255"),
                                ("dark", np.where(vessel, 100, 0), "0, 100")):
        with pytest.raises(UserError, match=f"label '.*{name}.png' holds the grey levels {found}: .*--num-classes K"):
            read_label(_save_gray(tmp_path, f"{name}.png", levels), "img", shape)


def test_soft_edged_one_class_labels_still_pass(tmp_path):
    """Resized, anti-aliased or JPEG-saved 0/255 drawings are split at 128, as the docs say."""
    label = synthetic_fundus(120, 110, seed=4)[1]
    drawing = Image.fromarray(label.astype(np.uint8) * 255)
    for name, im in (("bilinear.png", drawing.resize((73, 80), Image.BILINEAR)),
                     ("box.png", drawing.resize((55, 60), Image.BOX)),
                     ("jpeg.jpg", drawing.convert("RGB"))):
        im.save(tmp_path / name, quality=50)
        levels = np.array(Image.open(tmp_path / name).convert("L"))
        assert len(np.unique(levels)) > 3, name  # grey edges are there
        assert np.array_equal(read_label(str(tmp_path / name), "img", levels.shape), levels >= 128), name


def test_16_bit_images_labels_and_masks(tmp_path):
    ramp = np.linspace(0, 65535, 40 * 44).reshape(40, 44).astype(np.uint16)
    for name in ("ramp.png", "ramp.tif"):
        Image.fromarray(ramp).save(tmp_path / name)
        assert Image.open(tmp_path / name).mode.startswith("I")
        rgb = read_image(str(tmp_path / name), "RGB")
        expected = np.rint(ramp / 257).astype(np.uint8)  # scaled by the bit depth, not clipped at 255
        assert np.array_equal(rgb, np.stack([expected] * 3, axis=-1)), name
    vessel = ramp > 30000
    for scale in (1, 255, 65535):  # 0/1, 0/255 and 0/65535 in 16 bits
        path = tmp_path / f"label{scale}.png"
        Image.fromarray(vessel.astype(np.uint16) * scale).save(path)
        assert np.array_equal(read_label(str(path), "img", vessel.shape), vessel), scale
        assert np.array_equal(read_binary(str(path), "img", vessel.shape), vessel), scale
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(UserError, match=r"cannot decode image '.*float.tif': its pixels are floating-point"):
        read_image(str(tmp_path / "float.tif"), "RGB")


def test_an_empty_field_of_view_is_named(tmp_path):
    img = synthetic_fundus(40, 44, seed=0)[0]
    Image.fromarray(np.zeros((40, 44), dtype=np.uint8)).save(tmp_path / "mask.gif")
    with pytest.raises(UserError, match=r"the FOV mask '.*mask.gif' of image 'a.png' holds no pixels"):
        field_of_view(img, str(tmp_path / "mask.gif"), "a.png")
    with pytest.raises(UserError, match=r"the FOV estimated for image 'b.png' holds no pixels"):
        field_of_view(np.zeros_like(img), None, "b.png")
    assert field_of_view(np.zeros_like(img), None, "b.png", fov="all").all()


# ---------------------------------------------------------------------------
# validation split


def test_holdout_is_seeded_sorted_and_checked():
    a = holdout(20, 4, seed=0)
    assert a == holdout(20, 4, seed=0) and a == sorted(set(a)) and len(a) == 4 and max(a) < 20
    assert len({tuple(holdout(20, 4, seed=s)) for s in range(5)}) > 1
    for bad in (0, 20, 21):
        with pytest.raises(UserError, match="--val-split"):
            holdout(20, bad)


@pytest.fixture(scope="module")
def no_test_split(tmp_path_factory):
    """A DRIVE root with training images only: --val-split must not need the test split."""
    root = str(tmp_path_factory.mktemp("trainonly"))
    write_synthetic_drive(root, num_train=6, num_test=0, seed=4, **SIZE)
    return root


def test_val_split_validates_on_held_out_training_images(no_test_split, tmp_path):
    out = tmp_path / "run"
    r = run_script("train.py", "--data-path", no_test_split, "--epochs", "1", "--val-split", "2",
                   "--output-dir", out, "--no-plots", *TINY_TRAIN)
    assert r.returncode == 0, r.stderr
    train = dataset_files("drive", no_test_split, "training")
    expected = [os.path.basename(train[i].image) for i in holdout(len(train), 2, 0)]
    assert f"validation: 2 held-out training images ({', '.join(expected)})" in r.stdout
    saved = load_checkpoint(str(out / "checkpoint.pth"))["args"]
    assert saved["val_images"] == expected and saved["val_split"] == 2
    # Without --val-split the (missing) test split is what validation needs: one clear error line.
    r = run_script("train.py", "--data-path", no_test_split, "--epochs", "1", "--output-dir", tmp_path / "x",
                   *TINY_TRAIN)
    assert r.returncode != 0
    assert r.stderr.strip() == (f"error: the drive dataset in '{no_test_split}' has no test images to validate on; "
                                "hold out training images with --val-split N")


def test_resume_keeps_the_held_out_images(no_test_split, tmp_path):
    out = tmp_path / "run"
    args = ["--data-path", no_test_split, "--epochs", "2", "--output-dir", out, "--no-plots", *TINY_TRAIN]
    assert run_script("train.py", *args, "--val-split", "2", "--val-seed", "3", "--stop-epoch", "0").returncode == 0
    r = run_script("train.py", *args, "--resume", out / "checkpoint.pth")
    assert r.returncode == 0, r.stderr
    assert "val_split=2 (checkpoint)" in r.stdout and "val_seed=3 (checkpoint)" in r.stdout  # not retyped
    r = run_script("train.py", *args, "--resume", out / "checkpoint.pth", "--val-split", "3")
    assert r.returncode != 0 and "--val-split 3 contradicts checkpoint" in r.stderr


# ---------------------------------------------------------------------------
# test_metrics.csv


def _plain_metrics(pred, target):
    """Dice, sensitivity, specificity, accuracy, F1 and AUC of one image, written from the formulas."""
    probs, classes = pred
    valid = target != IGNORE_INDEX
    p, g, score = classes[valid] != 0, target[valid] != 0, probs[valid]
    tp, fp = int((p & g).sum()), int((p & ~g).sum())
    tn, fn = int((~p & ~g).sum()), int((~p & g).sum())
    s = tp + fp + tp + fn
    dice = (2 * tp + 1e-6) / ((s if s else 2 * tp) + 1e-6)
    pos, neg = score[g], score[~g]
    wins = sum(float((x > neg).sum()) + 0.5 * float((x == neg).sum()) for x in pos)
    auc = wins / (len(pos) * len(neg)) if len(pos) and len(neg) else float("nan")
    return {"dice": dice, "sensitivity": tp / (tp + fn) if tp + fn else 0.0,
            "specificity": tn / (tn + fp) if tn + fp else 0.0, "accuracy": (tp + tn) / (tp + tn + fp + fn),
            "f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0, "auc": auc}


def test_test_only_writes_per_image_and_pooled_metrics(drive_root, tmp_path):
    out = tmp_path / "run"
    assert run_script("train.py", "--data-path", drive_root, "--epochs", "1", "--output-dir", out, "--no-plots",
                      *TINY_TRAIN).returncode == 0
    evaluated = tmp_path / "eval"
    r = run_script("train.py", "--data-path", drive_root, "--test-only", "--resume", out / "checkpoint.pth",
                   "--output-dir", evaluated, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    with open(evaluated / "test_metrics.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][0] == "dataset" and {r_[0] for r_ in rows[1:]} == {"drive"}
    rows = [r_[1:] for r_ in rows]
    assert rows[0] == ["image", "dice", "sensitivity", "specificity", "accuracy", "f1", "auc", "cl_recall",
                       "cl_precision", "cldice"]
    test = dataset_files("drive", drive_root, "test")
    assert [r_[0] for r_ in rows[1:]] == names(test) + ["pooled"]

    # Per image: the metrics from a plain loop over the checkpoint's own predictions.
    import train
    ckpt = load_checkpoint(str(out / "checkpoint.pth"))
    model = train.create_model(2, base_c=4)
    model.load_state_dict(ckpt["model"])
    model.eval()
    from train_utils.transforms import normalize_image
    mean, std = ckpt["args"]["mean"], ckpt["args"]["std"]
    ds = VesselDataset(test)
    for k, row in enumerate(rows[1:-1]):
        image, target = ds[k]
        with torch.no_grad():
            logits = model(normalize_image(image[None], mean, std))["out"][0]
        probs = (1 - logits.softmax(0)[0]).numpy()
        expected = _plain_metrics((probs, logits.argmax(0).numpy()), target.numpy())
        t = target.numpy()
        expected.update(cldice(loop_counts(logits.argmax(0).numpy() != 0, t != 0, t != 255)))
        got = dict(zip(rows[0][1:], map(float, row[1:])))
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=2e-4) or (math.isnan(value) and math.isnan(got[key])), \
                (row[0], key)
    # The pooled row is what was printed.
    printed = dict(re.findall(r"^(sensitivity|specificity|accuracy|f1|auc|cl_recall|cl_precision|cldice): ([0-9.]+)$",
                              r.stdout, re.M))
    assert len(printed) == 8
    pooled = dict(zip(rows[0][1:], rows[-1][1:]))
    assert f"{float(pooled['dice']):.3f}" == re.search(r"dice coefficient: ([0-9.]+)", r.stdout).group(1)
    for key, value in printed.items():
        assert f"{float(pooled[key]):.4f}" == value
    assert float(pooled["dice"]) == pytest.approx(np.mean([float(r_[1]) for r_ in rows[1:-1]]), abs=1e-6)


# ---------------------------------------------------------------------------
# large images: tiled validation


def test_tiled_validation_is_predict_pys_tiled_prediction():
    torch.manual_seed(0)
    import train
    model = spread_output(train.create_model(2, base_c=4), torch.randn(1, 3, 64, 64)).eval()
    image = torch.randint(0, 256, (1, 3, 70, 90), dtype=torch.uint8)
    from train_utils.transforms import normalize_image
    x = normalize_image(image)
    with torch.no_grad():
        plain = model(x)["out"]
        whole = evaluation_log_probs(model, x, tile_size=0)
        tiled = evaluation_log_probs(model, x, tile_size=32, tile_overlap=16)
    assert torch.equal(whole, plain)  # images that fit: the plain forward pass, as the tutorial's evaluation
    probs, tiles = predict_probabilities(model, image, [0.709, 0.381, 0.224], [0.127, 0.079, 0.043],
                                         tile_size=32, tile_overlap=16)
    assert tiles > 1
    assert torch.allclose(tiled.softmax(1), probs, atol=1e-5)
    assert torch.equal(tiled.argmax(1), probs.argmax(1))
    assert not torch.equal(tiled.argmax(1), plain.argmax(1))  # really tiled: differs from the whole-image pass


def test_hrf_trains_with_tiled_validation_and_predicts_with_its_masks(layouts, tmp_path):
    out = tmp_path / "run"
    r = run_script("train.py", "--dataset", "hrf", "--data-path", layouts["hrf"], "--epochs", "1",
                   "--val-tile-size", "32", "--output-dir", out, *TINY_TRAIN)
    assert r.returncode == 0, r.stderr
    assert (out / "val_preview.png").is_file()
    pred = tmp_path / "pred"
    r = run_script("predict.py", "--weights", out / "checkpoint.pth", "--img", os.path.join(layouts["hrf"], "images"),
                   "--roi-mask", os.path.join(layouts["hrf"], "mask"), "--output", pred, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    for s in dataset_files("hrf", layouts["hrf"], "training") + dataset_files("hrf", layouts["hrf"], "test"):
        stem = split_ext(os.path.basename(s.image))[0]
        mask = np.array(Image.open(pred / f"{stem}.png"))
        fov = np.array(Image.open(s.mask).convert("L")) >= 128
        assert mask.shape == fov.shape and not mask[~fov].any()


# ---------------------------------------------------------------------------
# predict.py and compute_mean_std.py on the other datasets' files


def test_predict_reads_every_dataset_format(layouts, tmp_path, drive_root):
    out = tmp_path / "run"
    assert run_script("train.py", "--data-path", drive_root, "--epochs", "1", "--output-dir", out, "--no-plots",
                      *TINY_TRAIN).returncode == 0
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    img = read_image(dataset_files("chase_db1", layouts["chase_db1"], "training")[0].image, "RGB")
    Image.fromarray(img).save(inputs / "a.ppm")
    Image.fromarray(img).convert("L").save(inputs / "b.pgm")
    Image.fromarray(img).save(inputs / "c.tif")
    Image.fromarray(img).save(inputs / "d.JPG", quality=95)
    with gzip.open(inputs / "e.ppm.gz", "wb") as f:
        f.write((inputs / "a.ppm").read_bytes())
    r = run_script("predict.py", "--weights", out / "checkpoint.pth", "--img", inputs, "--output", tmp_path / "p",
                   "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "p")) == ["a.png", "b.png", "c.png", "d.png", "e.png", "predict_run.json"]
    # The gzip-compressed copy gives exactly the uncompressed file's prediction.
    assert np.array_equal(np.array(Image.open(tmp_path / "p" / "a.png")), np.array(Image.open(tmp_path / "p" / "e.png")))
    assert "FOV estimated" in r.stdout


def test_compute_mean_std_uses_the_estimated_fov(layouts):
    r = run_script("compute_mean_std.py", "--dataset", "chase_db1", "--data-path", layouts["chase_db1"])
    assert r.returncode == 0, r.stderr
    pixels = []
    for s in dataset_files("chase_db1", layouts["chase_db1"], "training"):
        img = read_image(s.image, "RGB")
        pixels.append(img[estimate_fov(img)[0]].astype(np.float64) / 255)
    pixels = np.concatenate(pixels)
    line = r.stdout.strip().splitlines()[-1]
    expected = "--mean " + " ".join(f"{v:.4f}" for v in pixels.mean(0)) + " --std " + \
        " ".join(f"{v:.4f}" for v in pixels.std(0))
    assert line == expected
    assert "dataset: chase_db1, split: training, images: 6" in r.stdout


# ---------------------------------------------------------------------------
# more than one class, end to end


def test_multiclass_folder_dataset_end_to_end(layouts, tmp_path):
    """Palette labels (vessels 1, optic disc 2), --num-classes 2: train, --test-only, predict.py's palette PNG."""
    root = layouts["folder2"]
    out = tmp_path / "run"
    common = ["--dataset", "folder", "--data-path", root, "--num-classes", "2"]
    r = run_script("train.py", *common, "--epochs", "2", "--output-dir", out, "--no-plots", *TINY_TRAIN)
    assert r.returncode == 0, r.stderr
    assert re.search(r"IoU: \['[0-9.]+', '[0-9.]+', '[0-9.]+'\]", r.stdout)  # three classes scored
    r = run_script("train.py", *common, "--test-only", "--resume", out / "checkpoint.pth", "--output-dir", out,
                   "--device", "cpu")
    assert r.returncode == 0, r.stderr
    with open(out / "test_metrics.csv") as f:
        assert [row[1] for row in csv.reader(f)][1:] == ["sample005.png", "sample006.png", "pooled"]
    pred = tmp_path / "pred"
    r = run_script("predict.py", "--weights", out / "checkpoint.pth",
                   "--img", os.path.join(root, "test", "images"), "--output", pred, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    im = Image.open(pred / "sample005.png")
    assert im.mode == "P" and set(np.unique(np.array(im))) <= {0, 1, 2}
    # A label with a class the run does not have is one error line naming the file.
    bad = tmp_path / "bad"
    write_synthetic(str(bad), "folder", 2, 1, seed=0, num_classes=2, **SIZE)
    r = run_script("train.py", "--dataset", "folder", "--data-path", bad, "--num-classes", "1", "--epochs", "1",
                   "--output-dir", tmp_path / "x", *TINY_TRAIN)
    assert r.returncode != 0
    assert re.fullmatch(r"error: label '.*sample001.png' holds class 2, but --num-classes 1 allows 0..1 "
                        r"\(and 255 for ignored pixels\)", r.stderr.strip())


def test_default_sizes_are_the_tutorials_for_drive_and_the_images_elsewhere(tmp_path):
    """--base-size: DRIVE's 565 (the tutorial's); elsewhere the median shorter side of the images it trains on.
    --crop-size: the tutorial's 480, or the base size if smaller. Typed values win."""
    import train
    from train_utils.settings import Machine, resolve_settings

    def sizes(*argv):
        args = train.parse_args(train.get_args_parser(), [str(a) for a in argv])
        s = resolve_settings(args, None, Machine("cpu", False), train.dataset_facts)
        return s.base_size, s.crop_size

    drive = tmp_path / "drive"
    write_synthetic(str(drive), "drive", 3, 1, seed=0, height=100, width=90)
    assert sizes("--data-path", drive) == (565, 480)
    folder = tmp_path / "folder"
    write_synthetic(str(folder), "folder", 3, 1, seed=0, height=100, width=90)
    assert sizes("--dataset", "folder", "--data-path", folder) == (90, 90)
    assert sizes("--dataset", "folder", "--data-path", folder, "--base-size", 300, "--crop-size", 128) == (300, 128)
