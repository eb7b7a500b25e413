"""The tutorial's numbers: checkpoints carry their model, the tutorial's own checkpoints load, validation is
float32 whatever --amp says, and failures are reported where they happen."""
import argparse
import builtins
import json
import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import train
from src import UNet
from tests.conftest import ROOT, TINY_TRAIN, run_script
from train_utils.distributed_utils import resolve_device, setup_for_distributed
from train_utils.errors import UserError, run_cli
from train_utils.imaging import read_image
from train_utils.train_and_eval import create_lr_scheduler
from train_utils.transforms import DRIVE_MEAN, DRIVE_STD, normalize_image


def parse(*argv):
    return train.parse_args(train.get_args_parser(), [str(a) for a in argv])


def without(flags, *names):
    """``flags`` without the options ``names`` and their values (one value each)."""
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
        elif f in names:
            skip = True
        else:
            out.append(f)
    return out


def last_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return json.loads(f.read().splitlines()[-1])


def printed(stdout, name):
    return float(re.search(rf"^{name}: ([0-9.]+)", stdout, re.M).group(1))


# A run trained with settings other than the defaults: base_c 4, its own mean and std.
OWN_NORM = ["--mean", "0.6", "0.3", "0.2", "--std", "0.2", "0.1", "0.05"]


@pytest.fixture(scope="module")
def trained(drive_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("own") / "run"
    r = run_script("train.py", "--data-path", drive_root, "--output-dir", out, "--epochs", 1, *TINY_TRAIN, *OWN_NORM)
    assert r.returncode == 0, r.stderr
    return out


def test_test_only_takes_the_model_from_the_checkpoint(drive_root, trained):
    """``--test-only --resume`` with none of the training's model flags reproduces its validation exactly."""
    r = run_script("train.py", "--data-path", drive_root, "--test-only", "--resume", trained / "checkpoint.pth",
                   "--output-dir", trained / "eval", *without(TINY_TRAIN, "--base-c"))
    assert r.returncode == 0, r.stderr
    assert "base_c=4 (checkpoint)" in r.stdout and "mean=0.6,0.3,0.2 (checkpoint)" in r.stdout  # what it took
    log = last_log(trained)
    assert printed(r.stdout, "dice coefficient") == round(log["dice"], 3)
    assert printed(r.stdout, "auc") == round(log["auc"], 4)


def test_resume_takes_the_model_from_the_checkpoint(drive_root, trained, tmp_path):
    out = tmp_path / "more"
    args = parse("--data-path", drive_root, "--output-dir", out, "--epochs", 2, "--resume", trained / "checkpoint.pth",
                 *without(TINY_TRAIN, "--base-c"))
    train.main(args)
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["args"]["base_c"] == 4
    assert ckpt["args"]["mean"] == [0.6, 0.3, 0.2] and ckpt["args"]["std"] == [0.2, 0.1, 0.05]


@pytest.mark.parametrize("flags,message", [
    (["--base-c", "8"], r"--base-c 8 contradicts checkpoint .* base_c 4"),
    (["--num-classes", "2"], r"--num-classes 2 contradicts checkpoint .* num_classes 1"),
    (["--mean", "0.7", "0.3", "0.2"], r"--mean 0.7 0.3 0.2 contradicts checkpoint .* mean 0.6 0.3 0.2"),
    (["--model", "vgg16_unet"], r"--model vgg16_unet contradicts checkpoint .* model unet"),
])
def test_explicit_flag_that_contradicts_the_checkpoint_is_an_error(drive_root, trained, flags, message):
    argv = ["--data-path", drive_root, "--test-only", "--resume", trained / "checkpoint.pth",
            "--output-dir", trained / "eval", *without(TINY_TRAIN, "--base-c"), *flags]
    with pytest.raises(UserError, match=message):
        train.main(parse(*argv))
    r = run_script("train.py", *argv)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "contradicts" in lines[0], r.stderr
    # The same value as the checkpoint's is no contradiction.
    train.main(parse(*argv[:-len(flags)], "--base-c", "4"))


# ---------------------------------------------------------------------------
# the tutorial's own checkpoints

# The tutorial's train.py arguments, pickled into its checkpoints as an argparse.Namespace.
TUTORIAL_ARGS = dict(device="cuda", data_path="./", num_classes=1, batch_size=4, epochs=200, lr=0.01, momentum=0.9,
                     weight_decay=1e-4, print_freq=1, resume="", start_epoch=0, save_best=True, amp=False)


@pytest.fixture(scope="module")
def tutorial_ckpt(tmp_path_factory):
    """A checkpoint as the tutorial's train.py saves it: its U-Net (base_c 32), SGD, the per-step LambdaLR,
    the epoch and ``args`` as a Namespace. The output layer is scaled so the model predicts both classes."""
    torch.manual_seed(0)
    model = UNet(in_channels=3, num_classes=2, base_c=32)
    with torch.no_grad():
        model.out_conv[0].weight.mul_(40)
        model.out_conv[0].bias.copy_(torch.tensor([0.0, 0.0]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    scheduler = create_lr_scheduler(optimizer, 5, 200, warmup=True)
    path = tmp_path_factory.mktemp("tutorial") / "best_model.pth"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(), "epoch": 0, "args": argparse.Namespace(**TUTORIAL_ARGS)}, path)
    return path, model.eval()


def test_tutorial_checkpoint_is_the_tutorials_format(tutorial_ckpt):
    path, model = tutorial_ckpt
    keys = set(model.state_dict())
    # The tutorial's module names, as its state dicts hold them.
    assert {"in_conv.0.weight", "in_conv.1.running_mean", "down1.1.0.weight", "down4.1.4.weight",
            "up1.conv.0.weight", "up4.conv.3.weight", "out_conv.0.weight", "out_conv.0.bias"} <= keys
    with pytest.raises(Exception):  # plain weights_only loading refuses the Namespace: why it needs allowing
        torch.load(path, weights_only=True)


def test_predict_runs_a_tutorial_checkpoint(drive_root, tutorial_ckpt, tmp_path):
    path, model = tutorial_ckpt
    img_path = os.path.join(drive_root, "DRIVE", "test", "images", "01_test.tif")
    mask_path = os.path.join(drive_root, "DRIVE", "test", "mask", "01_test_mask.gif")
    r = run_script("predict.py", "--weights", path, "--img", img_path, "--roi-mask", mask_path,
                   "--output", tmp_path / "p.png")
    assert r.returncode == 0, r.stderr
    assert "base_c 32" in r.stdout
    got = np.array(Image.open(tmp_path / "p.png")) == 255
    img = read_image(img_path, "RGB")
    fov = np.array(Image.open(mask_path).convert("L")) >= 128
    x = normalize_image(torch.from_numpy(img).permute(2, 0, 1)[None], DRIVE_MEAN, DRIVE_STD)
    with torch.no_grad():
        expected = model(x)["out"][0].argmax(0).numpy() == 1
    assert 0.05 < expected[fov].mean() < 0.95
    assert np.array_equal(got[fov], expected[fov]) and not got[~fov].any()


def test_test_only_and_resume_take_a_tutorial_checkpoint(drive_root, tutorial_ckpt, tmp_path):
    path, _ = tutorial_ckpt
    flags = without(TINY_TRAIN, "--base-c")
    r = run_script("train.py", "--data-path", drive_root, "--test-only", "--resume", path, "--output-dir",
                   tmp_path / "eval", *flags)
    assert r.returncode == 0, r.stderr
    assert "dice coefficient:" in r.stdout and "base_c=32" in r.stdout
    out = tmp_path / "continued"
    train.main(parse("--data-path", drive_root, "--output-dir", out, "--epochs", 2, "--resume", path, *flags))
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["args"]["base_c"] == 32 and isinstance(ckpt["args"], dict)


def test_a_namespace_is_all_that_is_allowed(tmp_path):
    """Allowing the tutorial's Namespace opens no door: other classes are still refused."""
    path = tmp_path / "odd.pth"
    torch.save({"model": {}, "args": argparse.FileType("r")}, path)  # another class of the same module
    with pytest.raises(UserError, match="refusing to load"):
        train.main(parse("--data-path", tmp_path, "--test-only", "--resume", path, *TINY_TRAIN))


# ---------------------------------------------------------------------------
# validation in float32


def test_amp_does_not_change_validation(drive_root, tmp_path):
    """With --amp (bfloat16 on the CPU) training, validation still runs in float32: a float32 --test-only of
    the saved weights gives the same dice and AUC as the epoch's validation."""
    out = tmp_path / "amp"
    r = run_script("train.py", "--data-path", drive_root, "--output-dir", out, "--epochs", 1, "--amp", *TINY_TRAIN)
    assert r.returncode == 0, r.stderr
    r = run_script("train.py", "--data-path", drive_root, "--test-only", "--resume", out / "checkpoint.pth",
                   "--output-dir", out, *TINY_TRAIN)
    assert r.returncode == 0, r.stderr
    log = last_log(out)
    assert printed(r.stdout, "auc") == round(log["auc"], 4)
    assert printed(r.stdout, "dice coefficient") == round(log["dice"], 3)


# ---------------------------------------------------------------------------
# errors


def _fails(exc):
    def main():
        raise exc
    return main


def test_bugs_show_their_traceback_bad_input_one_line(capsys, monkeypatch):
    monkeypatch.delenv("UNET_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        run_cli(_fails(UserError("file 'x' does not exist")))
    err = capsys.readouterr().err
    assert e.value.code == 1 and err == "error: file 'x' does not exist\n"
    with pytest.raises(SystemExit) as e:
        run_cli(_fails(RuntimeError("mat1 and mat2 shapes cannot be multiplied")))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1] == "error: RuntimeError: mat1 and mat2 shapes cannot be multiplied"


def test_every_rank_prints_its_own_error(capsys, monkeypatch):
    """Under DDP ``print`` is silenced on ranks other than 0; their errors must still be seen."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(builtins, "print", builtins.print)  # undone after the test
    setup_for_distributed(False)
    with pytest.raises(SystemExit):
        run_cli(_fails(UserError("label file 'y' is 10x10 but its image is 12x12")))
    assert capsys.readouterr().err == "error (rank 1): label file 'y' is 10x10 but its image is 12x12\n"


def test_torchrun_refuses_one_gpu_for_every_process():
    with pytest.raises(UserError, match="LOCAL_RANK"):
        resolve_device("cuda:0", local_rank=1, distributed=True)


def test_torchrun_errors_name_their_rank(tmp_path):
    """Both processes of a torchrun job given ``--device cuda:0`` report, each with its rank."""
    # torchrun stops the other workers as soon as it sees one fail; watching every 20 s instead of every 0.1 s
    # lets the slower process (on 2 shared cores its start-up was seen more than 5 s behind) print its own
    # error first.
    r = run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "--monitor-interval=20", os.path.join(ROOT, "train_multi_GPU.py")],
                   "--data-path", tmp_path, "--device", "cuda:0", timeout=120)
    assert r.returncode != 0
    for rank in (0, 1):
        assert f"error (rank {rank}): --device cuda:0: under torchrun" in r.stderr, r.stderr


def test_the_project_names_no_file_outside_it():
    """Users have only this repository: no file in it may point at a contract or data folder they lack."""
    banned = ["DESIGN" + ".md", "shared" + "/data", "/work" + "/"]
    hits = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if (d == ".ci" or not d.startswith(".")) and d not in ("data", "save_weights", "__pycache__")]
        for name in files:
            if name.endswith((".py", ".md", ".txt", ".sh")) or name == "run":
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read()
                hits += [f"{os.path.relpath(path, ROOT)}: {b}" for b in banned if b in text]
    assert not hits, hits
