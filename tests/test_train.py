"""End to end: train, resume, evaluate; checkpoints; errors on bad input. Tiny synthetic data on the CPU."""
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import src
import train
from tests.conftest import TINY_TRAIN, run_script
from train_utils.errors import UserError
from train_utils.train_and_eval import NonFiniteLossError


def parse(*argv):
    return train.parse_args(train.get_args_parser(), [str(a) for a in argv])


def read_log(out, name="log.jsonl"):
    with open(os.path.join(out, name)) as f:
        return [json.loads(line) for line in f]


def test_train_resume_and_test_only(drive_root, tmp_path):
    out = tmp_path / "run"
    r = run_script("train.py", "--data-path", drive_root, "--output-dir", out, "--epochs", 3, "--stop-epoch", 1,
                   *TINY_TRAIN)
    assert r.returncode == 0, r.stderr
    assert "dice coefficient: " in r.stdout and "global correct" in r.stdout and "mean IoU" in r.stdout
    assert "using cpu device" in r.stdout
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert set(ckpt) >= {"model", "optimizer", "lr_scheduler", "epoch", "best_dice", "args"}
    assert ckpt["epoch"] == 1 and isinstance(ckpt["args"], dict)
    assert ckpt["args"]["base_c"] == 4 and ckpt["args"]["model"] == "unet" and ckpt["args"]["num_classes"] == 1
    assert len(ckpt["args"]["mean"]) == 3
    best = torch.load(out / "best_model.pth", weights_only=True)
    log = read_log(out)
    assert [rec["epoch"] for rec in log] == [0, 1]
    assert ckpt["best_dice"] == pytest.approx(max(rec["dice"] for rec in log))
    assert best["best_dice"] == pytest.approx(ckpt["best_dice"])

    r = run_script("train.py", "--data-path", drive_root, "--output-dir", out, "--epochs", 3,
                   "--resume", out / "checkpoint.pth", *TINY_TRAIN)
    assert r.returncode == 0, r.stderr
    assert f"best dice {ckpt['best_dice']:.3f}" in r.stdout  # best dice restored, not reset to 0
    assert "Epoch: [2]" in r.stdout and "Epoch: [1]" not in r.stdout
    log = read_log(out)
    assert [rec["epoch"] for rec in log] == [0, 1, 2]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 2
    results = [f for f in os.listdir(out) if f.startswith("results")]
    assert results and all("dice coefficient:" in open(out / f).read() for f in results)

    # --test-only on the last checkpoint reproduces the last validation.
    r = run_script("train.py", "--data-path", drive_root, "--test-only", "--resume", out / "checkpoint.pth",
                   "--output-dir", out, *TINY_TRAIN)
    assert r.returncode == 0, r.stderr
    assert f"dice coefficient: {log[-1]['dice']:.3f}" in r.stdout
    assert f"global correct: {log[-1]['global_correct']:.1f}" in r.stdout
    assert "sensitivity:" in r.stdout and "auc:" in r.stdout
    assert "(" not in r.stdout.split("dice coefficient:")[1].splitlines()[0]  # not a tuple (reference bug 3)


def test_resume_is_exact(drive_root, tmp_path):
    """Stopped after epoch 0 and resumed, a seeded CPU run ends with the same weights as one straight run."""
    common = ["--data-path", drive_root, "--epochs", 2, "--deterministic", *TINY_TRAIN]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.main(parse(*common, "--output-dir", straight))
    train.main(parse(*common, "--output-dir", split, "--stop-epoch", 0))
    train.main(parse(*common, "--output-dir", split, "--resume", split / "checkpoint.pth"))
    a = torch.load(straight / "checkpoint.pth", weights_only=True)
    b = torch.load(split / "checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert read_log(straight)[-1]["train_loss"] == read_log(split)[-1]["train_loss"]


def test_validation_does_not_change_the_trained_model(drive_root, tmp_path):
    """Validating after every epoch or only after the last trains the same weights: validation draws nothing
    from the random stream that training's crops, flips and shuffles come from."""
    common = ["--data-path", drive_root, "--epochs", 3, "--deterministic", "--no-plots", *TINY_TRAIN]
    every, last = tmp_path / "every", tmp_path / "last"
    train.main(parse(*common, "--output-dir", every, "--eval-every", 1))
    train.main(parse(*common, "--output-dir", last, "--eval-every", 3))
    assert [r["epoch"] for r in read_log(every)] == [0, 1, 2] and [r["epoch"] for r in read_log(last)] == [2]
    a = torch.load(every / "checkpoint.pth", weights_only=True)["model"]
    b = torch.load(last / "checkpoint.pth", weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_demo_flag_sets_cpu_sized_defaults():
    from train_utils.settings import DEMO, Machine, resolve_settings

    def resolve(*argv):
        return resolve_settings(parse(*argv), None, Machine("cuda", False))
    args = resolve("--demo", "--epochs", "1")
    assert args.epochs == 1 and args.data_path == DEMO["data_path"]
    assert args.base_c == DEMO["base_c"] and args.device == "cpu"
    assert resolve().epochs == 200 and resolve().base_c == 32  # the tutorial's defaults otherwise


@pytest.mark.parametrize("argv,message", [
    (["--num-classes", "0"], "--num-classes must be at least 1"),
    (["-b", "9"], "--batch-size 9 is larger than the 4 training images"),
    (["--device", "cuda:0"], "CUDA is not available"),
    (["--test-only"], "--test-only needs the weights"),
    (["--scale-range", "1.2", "0.5"], "--scale-range needs 0 < MIN <= MAX"),
    (["--fov-diameter-max", "500"], "--fov-diameter-max 500 needs --fov-diameter between 1 and it"),
    (["--fov-diameter", "600", "--fov-diameter-max", "500"], "--fov-diameter-max 500 needs --fov-diameter between"),
    (["--base-size", "-1"], "--base-size must be >= 0"),
])
def test_bad_arguments_are_user_errors(drive_root, tmp_path, argv, message):
    # "CUDA is not available" holds on every machine: tests not marked cuda see none (conftest.py).
    args = parse("--data-path", drive_root, "--output-dir", tmp_path, *TINY_TRAIN, *argv)
    with pytest.raises(UserError, match=message):
        train.main(args)


def test_bad_paths_are_user_errors(drive_root, tmp_path):
    base = ["--epochs", "1", *TINY_TRAIN]
    with pytest.raises(UserError, match="must name the folder that holds DRIVE"):
        train.main(parse("--data-path", tmp_path / "none", "--output-dir", tmp_path / "o", *base))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write to --output-dir"):
        train.main(parse("--data-path", drive_root, "--output-dir", blocker / "sub", *base))
    not_ckpt = tmp_path / "notes.pth"
    not_ckpt.write_text("hello")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        train.main(parse("--data-path", drive_root, "--output-dir", tmp_path / "o", "--resume", not_ckpt, *base))
    torch.save({"weights": [1, 2]}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not a U-Net checkpoint"):
        train.main(parse("--data-path", drive_root, "--output-dir", tmp_path / "o",
                         "--resume", tmp_path / "other.pth", *base))
    noise = tmp_path / "noise.pth"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint: neither a zip archive nor a pickle"):
        train.main(parse("--data-path", drive_root, "--output-dir", tmp_path / "o", "--resume", noise, *base))
    (tmp_path / "run").mkdir()
    torch.save({"weights": [1, 2]}, tmp_path / "run" / "checkpoint.pth")
    with pytest.raises(UserError, match=r"checkpoint '.*run' is a folder: name the file in it \(checkpoint.pth\)"):
        train.main(parse("--data-path", drive_root, "--output-dir", tmp_path / "o", "--resume", tmp_path / "run",
                         *base))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_that_runs_code_is_refused(drive_root, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "args": {}, "payload": _Exploit(str(marker))}, evil)
    with pytest.raises(UserError, match="refusing to load"):
        train.main(parse("--data-path", drive_root, "--test-only", "--resume", evil, *TINY_TRAIN))
    assert not marker.exists()
    # The raw pickle protocol route too (a file that is not a zip archive).
    raw = tmp_path / "raw.pth"
    with open(raw, "wb") as f:
        pickle.dump(_Exploit(str(marker)), f)
    with pytest.raises(UserError):
        train.main(parse("--data-path", drive_root, "--test-only", "--resume", raw, *TINY_TRAIN))
    assert not marker.exists()


def test_non_finite_loss_stops_and_keeps_last_checkpoint(drive_root, tmp_path):
    out = tmp_path / "run"
    common = ["--data-path", drive_root, "--output-dir", out, *TINY_TRAIN]
    train.main(parse(*common, "--epochs", 1))
    before = (out / "checkpoint.pth").read_bytes()
    # A diverging run into the same folder stops at once and leaves the earlier run's files alone.
    with pytest.raises(NonFiniteLossError, match=r"at epoch 0, step \d"):
        train.main(parse(*common, "--epochs", 3, "--lr", "1e30"))
    assert (out / "checkpoint.pth").read_bytes() == before
    torch.load(out / "checkpoint.pth", weights_only=True)


def test_cli_errors_are_one_line(tmp_path):
    r = run_script("train.py", "--data-path", tmp_path, "--device", "cpu")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "DRIVE" in lines[0], r.stderr
    r = run_script("train.py", "--amp", "False")  # type=bool made this turn AMP *on*
    assert r.returncode == 2 and "unrecognized arguments: False" in r.stderr


def test_log_is_strict_json_when_a_metric_is_undefined(tmp_path):
    """A test split without vessels has no ROC AUC: log.jsonl holds null, not a bare NaN."""
    import numpy as np
    from PIL import Image

    from train_utils.synthetic import write_synthetic_drive
    root = tmp_path / "data"
    write_synthetic_drive(str(root), num_train=4, num_test=1, height=64, width=60, seed=2)
    Image.fromarray(np.zeros((64, 60), dtype=np.uint8)).save(root / "DRIVE/test/1st_manual/01_manual1.gif")
    out = tmp_path / "run"
    train.main(parse("--data-path", root, "--output-dir", out, "--epochs", 1, *TINY_TRAIN))
    text = (out / "log.jsonl").read_text()
    assert "NaN" not in text
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert record["auc"] is None and isinstance(record["dice"], float)


@pytest.mark.parametrize("script,lr", [("train.py", "-5"), ("train_multi_GPU.py", "nan")])
def test_impossible_lr_is_one_line_before_anything_is_written(drive_root, tmp_path, script, lr):
    r = run_script(script, "--data-path", drive_root, "--output-dir", tmp_path / "run", "--lr", lr, *TINY_TRAIN)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines == [f"error: --lr must be a finite number >= 0 (got {float(lr)})"], r.stderr
    assert not (tmp_path / "run").exists()


def test_a_failed_run_leaves_no_new_empty_output_folder(drive_root, tmp_path, capsys):
    """The batch-size check of a --val-split run comes after the output folder is made: the folder goes again."""
    out = tmp_path / "new" / "run"
    with pytest.raises(SystemExit):
        train.cli(parse("--data-path", drive_root, "--output-dir", out, "--val-split", 3, *TINY_TRAIN))
    assert "--batch-size 2 is larger than the 1 training images" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()  # a folder that was there stays
    with pytest.raises(SystemExit):
        train.cli(parse("--data-path", drive_root, "--output-dir", tmp_path / "kept", "--val-split", 3, *TINY_TRAIN))
    assert (tmp_path / "kept").is_dir()


def test_log_has_one_record_per_epoch_across_resumes_and_new_runs(drive_root, tmp_path):
    out = tmp_path / "run"
    common = ["--data-path", drive_root, "--output-dir", out, "--epochs", 3, "--no-plots", *TINY_TRAIN]
    train.main(parse(*common, "--stop-epoch", 1))
    # Killed after logging epoch 2 but before its checkpoint, the last line half written (an older version).
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "dice": 0.5}) + "\n" + '{"epoch": 2, "di')
    train.main(parse(*common, "--resume", out / "checkpoint.pth"))
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1, 2] and log[2]["dice"] != 0.5
    train.main(parse(*common, "--epochs", 1))  # a new run in the same folder: a new log, the old one kept
    assert [r["epoch"] for r in read_log(out)] == [0]
    kept = [n for n in os.listdir(out) if n.startswith("log-") and n.endswith(".jsonl")]
    assert len(kept) == 1 and [r["epoch"] for r in read_log(out, kept[0])] == [0, 1, 2]


def write_folder_dataset(root, train_size, test_size):
    """A folder dataset of two training and one test image, of the given (width, height)."""
    for split, size, names in (("training", train_size, "ab"), ("test", test_size, "c")):
        for folder in ("images", "labels"):
            os.makedirs(root / split / folder, exist_ok=True)
        for name in names:
            Image.new("RGB", size, (150, 80, 40)).save(root / split / "images" / f"{name}.png")
            label = np.zeros(size[::-1], dtype=np.uint8)
            label[:, size[0] // 2] = 255
            Image.fromarray(label).save(root / split / "labels" / f"{name}.png")


def test_images_smaller_than_the_network_are_refused(tmp_path):
    root = tmp_path / "data"
    write_folder_dataset(root, (64, 64), (10, 10))
    common = ["--dataset", "folder", "--data-path", root, "--fov", "all", "--output-dir", tmp_path / "o",
              "--epochs", 1, *TINY_TRAIN]
    message = r"image '.*c.png' is 10x10 pixels, smaller than the 16x16 the unet model needs"
    with pytest.raises(UserError, match=message):
        train.main(parse(*common))
    weights = tmp_path / "w.pth"
    torch.save({"model": src.build_model("unet", 2, 4).state_dict(), "args": {"num_classes": 1, "base_c": 4}}, weights)
    with pytest.raises(UserError, match=message):
        train.main(parse(*common, "--test-only", "--weights", weights))


def test_an_all_black_fov_mask_is_named_not_blamed_on_the_lr(drive_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(drive_root, root)
    mask = root / "DRIVE/training/mask/22_training_mask.gif"
    Image.new("L", Image.open(mask).size, 0).save(mask)
    with pytest.raises(UserError, match=r"the FOV mask '.*22_training_mask.gif' of image '.*22_training.tif' holds no"):
        train.main(parse("--data-path", root, "--output-dir", tmp_path / "o", "--epochs", 1, *TINY_TRAIN))
