"""Pictures of a training run (curves.png, val_preview.png), TensorBoard logging, and their failure modes."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import train
from tests.conftest import ROOT, TINY_TRAIN, run_script
from train_utils import pictures
from train_utils.metrics import DiceCoefficient
from train_utils.pictures import TrainingPictures


def parse(*argv):
    return train.parse_args(train.get_args_parser(), [str(a) for a in argv])


def png(path):
    """The picture at ``path`` as an RGB array; fails unless it is a complete PNG."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()  # decodes every byte: a truncated file raises
        return np.array(im.convert("RGB"))


def no_temp_files(folder):
    return not [n for n in os.listdir(folder) if ".tmp" in n]


@pytest.fixture
def made_pictures(monkeypatch):
    """The ``TrainingPictures`` objects that ``train.main`` makes, in order (to look at their history)."""
    made = []

    class Recorded(TrainingPictures):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(train, "TrainingPictures", Recorded)
    return made


# ---------------------------------------------------------------------------
# the pictures on hand-made inputs


def test_preview_colours_on_a_hand_made_case():
    # label:  row 0 vessel, row 1 background, row 2 outside the FOV (255)
    target = np.array([[1, 1, 1], [0, 0, 0], [255, 255, 255]], dtype=np.uint8)
    pred = np.array([[1, 0, 1], [1, 0, 0], [1, 0, 1]])
    out = pictures.preview_colours(pred, target)
    assert out.shape == (3, 3, 3) and out.dtype == np.uint8
    expected = [[pictures.TP_COLOUR, pictures.FN_COLOUR, pictures.TP_COLOUR],
                [pictures.FP_COLOUR, pictures.TN_COLOUR, pictures.TN_COLOUR],
                [pictures.OUTSIDE_COLOUR] * 3]  # predictions outside the FOV are not scored
    assert out.tolist() == [[list(c) for c in row] for row in expected]
    assert len({pictures.TP_COLOUR, pictures.FP_COLOUR, pictures.FN_COLOUR, pictures.TN_COLOUR,
                pictures.OUTSIDE_COLOUR}) == 5
    # any foreground class counts as vessel (several classes)
    assert pictures.preview_colours(np.array([[2]]), np.array([[1]]))[0, 0].tolist() == list(pictures.TP_COLOUR)
    with pytest.raises(ValueError):
        pictures.preview_colours(np.zeros((2, 2)), np.zeros((2, 3)))


def test_preview_picture_size_title_and_legend():
    rng = np.random.default_rng(0)
    big_pred, big_target = rng.integers(0, 2, (900, 1200)), rng.integers(0, 2, (900, 1200)).astype(np.uint8)
    big = pictures.preview_picture(big_pred, big_target, "title")
    assert big.width == 600 and big.height > 450  # 450 rows of image plus the title and legend lines
    small = pictures.preview_picture(np.ones((64, 60), int), np.ones((64, 60), np.uint8))
    k = (600 - 3 * 18) // 64
    img_h = 64 * k
    assert small.width == 60 * k and img_h < small.height <= 600  # enlarged by a whole factor
    assert pictures.preview_scale(584, 565) == (584, 565)  # DRIVE's size: drawn pixel for pixel
    arr = np.array(small)
    assert (arr[:img_h] == pictures.TP_COLOUR).all()  # crisp: every image pixel is a TP pixel
    legend = arr[img_h:].reshape(-1, 3).tolist()
    for colour, _ in pictures.LEGEND:  # a swatch of every colour in the legend
        assert list(colour) in legend


def test_plot_curves_writes_a_png_with_undefined_values(tmp_path):
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1), "lr": 0.01 * (1 - e / 5), "dice": 0.5 + 0.05 * e,
                "auc": None if e == 0 else float("nan") if e == 1 else 0.9} for e in range(5)]
    path = tmp_path / "curves.png"
    pictures.plot_curves(history, str(path))
    arr = png(path)
    assert arr.shape[0] >= 300 and arr.shape[1] >= 400 and arr.std() > 10  # a drawing, not a blank
    assert no_temp_files(tmp_path)
    before = path.read_bytes()
    pictures.plot_curves(history[:1], str(path))  # one epoch: still a picture; rewritten in place
    png(path)
    assert path.read_bytes() != before


class OneConv(torch.nn.Module):
    """A model in the U-Net's form (a dict with ``out``): one 1 x 1 convolution to 3 classes."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


def loop_image_dice(pred, target, num_classes, ignore_index=255, eps=1e-6):
    """The validation dice of one image from the formula: per foreground class over the pixels that are
    not ignored, (2 |P & T| + eps) / (|P| + |T| + eps) (1 when both are empty), averaged over the classes."""
    per_class = []
    for c in range(1, num_classes):
        both = p = t = 0
        for pc, tc in zip(pred.flatten().tolist(), target.flatten().tolist()):
            if tc != ignore_index:
                p, t, both = p + (pc == c), t + (tc == c), both + (pc == c and tc == c)
        per_class.append((2 * both + eps) / (p + t + eps) if p + t else 1.0)
    return sum(per_class) / len(per_class)


def test_preview_title_shows_the_validation_dice_of_the_image(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = OneConv()
    gen = torch.Generator().manual_seed(3)
    image, target = torch.randn(3, 10, 12, generator=gen), torch.randint(0, 3, (10, 12), generator=gen)
    target[:2] = 255  # outside the field of view
    titles = []
    draw = pictures.preview_picture
    monkeypatch.setattr(pictures, "preview_picture", lambda p, t, title="": titles.append(title) or draw(p, t, title))
    with TrainingPictures(str(tmp_path), last_epoch=1, debug=True) as run:
        run.after_best(4, model, [(image, target)], torch.device("cpu"))
    with torch.no_grad():
        logits = model(image[None])["out"]
    expected = loop_image_dice(logits.argmax(1)[0], target, 3)
    dice = DiceCoefficient(num_classes=3, ignore_index=255)
    dice.update(logits, target[None])
    assert dice.value.item() == pytest.approx(expected, abs=1e-6)
    assert titles == [f"best model, epoch 4: image 0, dice {expected:.3f}"]
    png(tmp_path / pictures.PREVIEW_FILE)


# ---------------------------------------------------------------------------
# in a training run


def test_training_writes_curves_and_preview(drive_root, tmp_path, made_pictures):
    out = tmp_path / "run"
    # --debug: a drawing failure raises instead of becoming a warning, so this test sees bugs.
    common = ["--data-path", drive_root, "--output-dir", out, "--epochs", 3, "--debug", *TINY_TRAIN]
    train.main(parse(*common, "--stop-epoch", 1))
    curves, preview = png(out / "curves.png"), png(out / "val_preview.png")
    assert curves.shape[1] >= 400 and max(preview.shape[:2]) <= 600
    assert preview.shape[1] == 60 * ((600 - 3 * 18) // 64)  # the 60 x 64 validation image, enlarged
    colours = {tuple(c) for c in preview.reshape(-1, 3).tolist()}
    assert {pictures.OUTSIDE_COLOUR, pictures.TN_COLOUR} <= colours
    assert no_temp_files(out)
    assert [r["epoch"] for r in made_pictures[-1].history] == [0, 1]

    train.main(parse(*common, "--resume", out / "checkpoint.pth"))  # the curves continue the earlier epochs
    assert [r["epoch"] for r in made_pictures[-1].history] == [0, 1, 2]
    logged = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["dice"] for r in made_pictures[-1].history] == [r["dice"] for r in logged]
    png(out / "curves.png")


def test_no_plots_writes_no_pictures(drive_root, tmp_path):
    out = tmp_path / "run"
    train.main(parse("--data-path", drive_root, "--output-dir", out, "--epochs", 1, "--no-plots", *TINY_TRAIN))
    assert (out / "checkpoint.pth").exists()
    assert not (out / "curves.png").exists() and not (out / "val_preview.png").exists()


def test_a_drawing_failure_never_stops_training(drive_root, tmp_path, monkeypatch, capsys):
    def broken(*a, **k):
        raise RuntimeError("no room for pictures")

    monkeypatch.setattr(pictures, "plot_curves", broken)
    monkeypatch.setattr(pictures, "preview_picture", broken)
    monkeypatch.delenv("UNET_DEBUG", raising=False)
    out = tmp_path / "run"
    args = ["--data-path", drive_root, "--output-dir", out, "--epochs", 2, *TINY_TRAIN]
    train.main(parse(*args))
    assert (out / "checkpoint.pth").exists()
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 2, warnings  # one line per picture, not one per epoch
    assert all("no room for pictures" in w and "training continues" in w for w in warnings)
    with pytest.raises(RuntimeError, match="no room"):  # --debug shows the bug instead
        train.main(parse(*args, "--output-dir", tmp_path / "debug", "--debug"))


def test_only_the_main_process_draws(tmp_path, monkeypatch):
    monkeypatch.setattr(pictures.utils, "is_main_process", lambda: False)
    with TrainingPictures(str(tmp_path), last_epoch=1) as run:
        run.after_epoch({"epoch": 0, "train_loss": 1.0, "lr": 0.01, "dice": 0.5, "auc": 0.9, "epoch_time": 1.0})
        run.after_best(0, None, None)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------
# TensorBoard


def test_tensorboard_logs_scalars_and_the_preview(drive_root, tmp_path, made_pictures):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train.main(parse("--data-path", drive_root, "--output-dir", out, "--epochs", 2, "--tensorboard", "--debug",
                     *TINY_TRAIN))
    assert made_pictures[-1].writer is None  # main closed the log when training ended
    events = EventAccumulator(str(out / pictures.TENSORBOARD_DIR))
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "val/dice", "val/auc"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("val/dice")] == [0, 1]
    assert "val/preview" in tags["images"]


def test_tensorboard_missing_is_one_line(drive_root, tmp_path):
    code = ("import sys, runpy; sys.modules['tensorboard'] = None; "
            f"sys.argv = ['train.py'] + sys.argv[1:]; runpy.run_path({os.path.join(ROOT, 'train.py')!r}, "
            "run_name='__main__')")
    r = run_script([sys.executable, "-c", code], "--data-path", drive_root, "--output-dir", tmp_path / "run",
                   "--epochs", 1, "--tensorboard", *TINY_TRAIN)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --tensorboard needs"), r.stderr
    assert "pip install tensorboard" in lines[0] and "requirements-extras.txt" in lines[0]
    assert not (tmp_path / "run").exists()  # refused before any work
