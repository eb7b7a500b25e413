"""``--recipe``: its defaults, the pieces it switches on (AdamW, cosine schedule, repeated crops, flip-averaged
evaluation, rarer validation), what its checkpoint hands on, and the benchmark that compares the recipes."""
import argparse
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import train
from my_dataset import DriveDataset, RepeatDataset, VesselDataset, drive_files
from tests.conftest import TINY_TRAIN, run_script, spread_output
from train_utils.evaluation import validate
from train_utils.inference import FlipAverage
from train_utils.precision import autocast_dtype, cpu_has_native_bf16
from train_utils.settings import RECIPES, Machine, fast_width, resolve_settings
from train_utils.train_and_eval import create_lr_scheduler
from train_utils.transforms import get_transform


def parse(*argv):
    return train.parse_args(train.get_args_parser(), [str(a) for a in argv])


def resolve(*argv, machine=Machine("cpu", cpu_bf16=False)):
    return resolve_settings(parse(*argv), None, machine)


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_fast_recipe_sets_its_defaults_and_typed_flags_win():
    tutorial = resolve()
    assert (tutorial.recipe, tutorial.base_c, tutorial.opt, tutorial.lr, tutorial.weight_decay) == (
        "tutorial", 32, "sgd", 0.01, 1e-4)
    # crop_size None: resolved to the tutorial's 480 for DRIVE from the dataset's base size
    assert (tutorial.lr_schedule, tutorial.crop_size, tutorial.batch_size, tutorial.epochs) == ("poly", None, 4, 200)
    assert (tutorial.crops_per_image, tutorial.rotate, tutorial.color_jitter, tutorial.eval_tta,
            tutorial.eval_every, tuple(tutorial.scale_range)) == (1, 0.0, 0.0, False, 1, (0.5, 1.2))

    fast = resolve("--recipe", "fast")
    for key, value in RECIPES["fast"].items():
        if key not in ("base_c", "amp"):  # decided by the machine
            assert getattr(fast, key) == value, key
    assert fast.opt == "adamw" and fast.base_c == 16 and fast.eval_tta is True and fast.crops_per_image == 4

    typed = resolve("--recipe", "fast", "--base-c", 32, "--no-eval-tta", "--opt", "sgd", "--epochs", 3)
    assert (typed.base_c, typed.eval_tta, typed.opt, typed.epochs) == (32, False, "sgd", 3)
    assert typed.lr_schedule == "cosine" and typed.crop_size == 256 and typed.batch_size == 4  # the recipe's
    assert {typed.source(k) for k in ("base_c", "eval_tta", "opt", "epochs", "recipe")} == {"flag"}

    # --demo's sizes win over the recipe's; the recipe keeps its optimiser, augmentation and evaluation.
    demo = resolve("--demo", "--recipe", "fast")
    assert (demo.crop_size, demo.base_size, demo.batch_size, demo.epochs) == (96, 128, 4, 30)
    assert (demo.opt, demo.lr_schedule, demo.rotate, demo.eval_tta) == ("adamw", "cosine", 90.0, True)


def test_amp_auto_is_on_only_where_it_is_faster():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert isinstance(cpu_has_native_bf16(), bool)
    amx = Machine("cpu", cpu_bf16=True)
    fast = resolve("--recipe", "fast", machine=amx)
    assert (fast.amp, fast.amp_dtype) == (True, "bfloat16")
    fast = resolve("--recipe", "fast")
    assert (fast.amp, fast.amp_dtype) == (False, None)  # emulated bfloat16 would be slower than float32
    fast = resolve("--recipe", "fast", machine=Machine("cuda", cpu_bf16=False))
    assert (fast.amp, fast.amp_dtype) == (True, "float16")
    assert resolve("--recipe", "fast", "--amp-dtype", "bfloat16", machine=Machine("cuda", False)).amp_dtype == \
        "bfloat16"
    # A typed --amp / --no-amp is obeyed on any CPU.
    assert resolve("--amp").amp_dtype == "bfloat16" and resolve("--recipe", "fast", "--no-amp", machine=amx).amp is False
    assert autocast_dtype(cpu, True) is torch.bfloat16 and autocast_dtype(cpu, False) is None
    assert autocast_dtype(cuda, True) is torch.float16

    # bfloat16 on the CPU trains in channels_last (oneDNN's faster layout for it); float32 on the CPU stays
    # NCHW for its exact BatchNorm statistics; a typed --channels-last / --no-channels-last wins.
    assert resolve("--amp", machine=amx).channels_last is True
    assert resolve().channels_last is False
    assert resolve("--amp", "--no-channels-last", machine=amx).channels_last is False
    assert resolve(machine=Machine("cuda", False)).channels_last is True

    assert resolve().amp is False and resolve("--amp").amp is True
    # The fast recipe's width follows the precision: the tutorial's 32 with AMP, 16 in float32; 50 epochs both.
    assert resolve("--recipe", "fast", machine=amx).base_c == 32 and resolve("--recipe", "fast").base_c == 16
    assert fast_width(True) == 32 and fast_width(False) == 16
    assert RECIPES["fast"]["epochs"] == 50


@pytest.mark.parametrize("amp", ["auto", "--no-amp", "--amp"])
def test_fast_recipe_width_is_decided_by_the_precision(drive_root, tmp_path, amp):
    out = tmp_path / "fast"
    flags = [] if amp == "auto" else [amp]
    tiny = [a for a in TINY_TRAIN if a not in ("--base-c", "4")]  # the width is the recipe's to choose
    # --stop-epoch 0: one epoch of the recipe's own schedule, whose length the recipe also chooses.
    r = run_script("train.py", "--data-path", drive_root, "--output-dir", out, "--recipe", "fast", *tiny, *flags,
                   "--stop-epoch", 0, "--crops-per-image", 1, "--no-eval-tta", "--no-plots")
    assert r.returncode == 0, r.stderr
    bf16 = {"auto": cpu_has_native_bf16(), "--no-amp": False, "--amp": True}[amp]
    saved = torch.load(out / "checkpoint.pth", weights_only=True)["args"]
    assert (saved["base_c"], saved["epochs"]) == ((32, 50) if bf16 else (16, 50))
    assert ("training in bfloat16 autocast, channels_last" if bf16 else "training in float32, NCHW") in r.stdout


@pytest.mark.parametrize("schedule", ["poly", "cosine"])
def test_scheduler_matches_the_formula(schedule):
    num_step, epochs, base_lr = 3, 5, 0.5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    sched = create_lr_scheduler(opt, num_step, epochs, warmup=True, schedule=schedule)
    seen = []
    for _ in range(num_step * epochs):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = []
    for x in range(num_step * epochs):
        if x <= num_step:  # one warm-up epoch from 1e-3 to 1
            factor = 1e-3 + (1 - 1e-3) * x / num_step
        else:
            p = (x - num_step) / ((epochs - 1) * num_step)
            factor = (1 - p) ** 0.9 if schedule == "poly" else 0.5 * (1 + math.cos(math.pi * p))
        expected.append(base_lr * factor)
    assert seen == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert seen[num_step] == pytest.approx(base_lr)
    if schedule == "cosine":  # half-way through the decay: half the rate
        assert seen[num_step + (epochs - 1) * num_step // 2] < base_lr * 0.6


def test_crops_per_image_repeats_every_image(drive_root, tmp_path):
    args = parse("--data-path", drive_root, *TINY_TRAIN, "--crops-per-image", 3, "--output-dir", tmp_path)
    s = resolve_settings(args, None, Machine("cpu", False), train.dataset_facts)
    proc = argparse.Namespace(distributed=False, world_size=1)
    loader, _ = train.build_data_loaders(s, proc, torch.device("cpu"))
    assert isinstance(loader.dataset, RepeatDataset) and len(loader.dataset) == 3 * 4
    sizes = [img.shape[0] for img, _ in loader]
    assert sum(sizes) == 12 and len(sizes) == 6  # batch 2
    # Each visit draws its own crop: the three visits of one image differ.
    torch.manual_seed(0)
    crops = [loader.dataset[i][0] for i in (0, 4, 8)]
    assert not torch.equal(crops[0], crops[1]) and not torch.equal(crops[1], crops[2])
    assert loader.dataset.collate_fn is DriveDataset.collate_fn


def _manual_flip_dice(model, dataset):
    """Mean over images of the vessel dice of argmax(mean softmax of the image and its two flips)."""
    dices = []
    with torch.no_grad():
        for i in range(len(dataset)):
            img, target = dataset[i]
            x = img[None]
            p = model(x)["out"].softmax(1)
            p = p + model(x.flip(3))["out"].softmax(1).flip(3) + model(x.flip(2))["out"].softmax(1).flip(2)
            pred = (p / 3).argmax(1)[0]
            valid = target != 255
            a = ((pred == 1) & valid).double().sum()
            b = ((target == 1) & valid).double().sum()
            inter = ((pred == 1) & (target == 1) & valid).double().sum()
            dices.append(float((2 * inter + 1e-6) / (a + b + 1e-6)) if a + b > 0 else 1.0)
    return float(np.mean(dices))


def test_eval_tta_scores_the_flip_average(drive_root):
    torch.manual_seed(0)
    model = train.create_model(2, base_c=4).eval()
    dataset = VesselDataset(drive_files(drive_root, "test"), transforms=get_transform(False))
    spread_output(model, torch.stack([dataset[i][0] for i in range(len(dataset))]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=DriveDataset.collate_fn)
    cpu = torch.device("cpu")
    result = validate(model, loader, cpu, 2, tta=True)
    dice_tta, vessel_tta = result.dice, result.vessel
    dice_plain = validate(model, loader, cpu, 2, tta=False).dice
    assert dice_tta == pytest.approx(_manual_flip_dice(model, dataset), abs=1e-5)
    assert abs(dice_tta - dice_plain) > 1e-4  # the flips changed the prediction: the test can tell them apart
    # The wrapper's output is the log of the averaged probabilities, so softmax gives them back.
    x = dataset[0][0][None]
    with torch.no_grad():
        avg = FlipAverage(model)(x)["out"].softmax(1)
        manual = (model(x)["out"].softmax(1) + model(x.flip(3))["out"].softmax(1).flip(3)
                  + model(x.flip(2))["out"].softmax(1).flip(2)) / 3
    assert torch.allclose(avg, manual, atol=1e-6)
    assert 0 < vessel_tta["auc"] < 1


def test_fast_run_records_its_recipe_and_test_only_uses_it(drive_root, tmp_path):
    out = tmp_path / "fast"
    r = run_script("train.py", "--data-path", drive_root, "--output-dir", out, "--recipe", "fast", *TINY_TRAIN,
                   "--epochs", 3, "--eval-every", 2, "--no-plots")
    assert r.returncode == 0, r.stderr
    log = read_log(out)
    assert [rec["epoch"] for rec in log] == [1, 2]  # every 2nd epoch, and always the last
    assert log[1]["elapsed"] > log[0]["elapsed"] > log[0]["epoch_time"] > 0
    assert sum(line.startswith("dice coefficient: ") for line in r.stdout.splitlines()) == 2
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    saved = ckpt["args"]
    assert saved["recipe"] == "fast" and saved["eval_tta"] is True and saved["opt"] == "adamw"
    assert saved["crops_per_image"] == 4 and saved["base_c"] == 4  # TINY_TRAIN's width won
    assert saved["amp"] is None  # "where it is faster": resolved per machine, so a resume on a GPU uses its AMP
    precision = "bfloat16 autocast, channels_last" if cpu_has_native_bf16() else "float32, NCHW"
    assert f"training in {precision}" in r.stdout
    assert "exp_avg_sq" in ckpt["optimizer"]["state"][0]  # an AdamW state
    # Training steps: 4 images x 4 crops / batch 2 = 8 per epoch.
    assert ckpt["lr_scheduler"]["last_epoch"] == 3 * 8

    # --test-only with no recipe flag scores the model as its training validated it (flip averaging) ...
    r = run_script("train.py", "--data-path", drive_root, "--test-only", "--resume", out / "checkpoint.pth",
                   "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "eval_tta=True (checkpoint)" in r.stdout and "recipe=fast (checkpoint)" in r.stdout
    assert f"dice coefficient: {log[-1]['dice']:.3f}" in r.stdout
    # ... and in process, the whole record matches the last validation to float precision.
    args = parse("--data-path", drive_root, "--test-only", "--resume", "ckpt", "--device", "cpu")
    s = resolve_settings(args, dict(saved), Machine("cpu", False))
    assert s.eval_tta is True and s.recipe == "fast"
    typed = resolve_settings(parse("--test-only", "--resume", "ckpt", "--no-eval-tta"), dict(saved),
                             Machine("cpu", False))
    assert typed.eval_tta is False and typed.recipe == "fast"  # a typed flag wins without an error

    # A fast run resumes as a fast run: AdamW state, the cosine schedule, its crops.
    r = run_script("train.py", "--data-path", drive_root, "--output-dir", out, "--resume", out / "checkpoint.pth",
                   "--device", "cpu", "--epochs", 4, "--no-plots")
    assert r.returncode == 0, r.stderr
    after = torch.load(out / "checkpoint.pth", weights_only=True)
    assert after["epoch"] == 3 and after["args"]["opt"] == "adamw" and after["lr_scheduler"]["last_epoch"] == 4 * 8


def test_predict_uses_the_checkpoints_flip_averaging(drive_root, tmp_path):
    out = tmp_path / "fast"
    r = run_script("train.py", "--data-path", drive_root, "--output-dir", out, "--recipe", "fast", *TINY_TRAIN,
                   "--epochs", 1, "--no-plots")
    assert r.returncode == 0, r.stderr
    img = os.path.join(drive_root, "DRIVE", "test", "images", "01_test.tif")
    probs = {}
    for name, flags in (("default", []), ("tta", ["--tta"]), ("plain", ["--no-tta"])):
        r = run_script("predict.py", "--weights", out / "checkpoint.pth", "--img", img, "--output",
                       tmp_path / name, "--save-prob", "--device", "cpu", *flags)
        assert r.returncode == 0, r.stderr
        probs[name] = np.asarray(Image.open(tmp_path / name / "01_test_prob.png"), dtype=np.int32)
    assert np.array_equal(probs["default"], probs["tta"])
    assert np.abs(probs["default"] - probs["plain"]).max() > 0


def test_benchmark_recipes_mode_end_to_end(tmp_path):
    png, out_json = tmp_path / "recipes.png", tmp_path / "recipes.json"
    r = run_script("benchmarks/benchmark.py", "--mode", "recipes", "--images", 4, "--val-images", 2,
                   "--image-size", 64, 60, "--tutorial-epochs", 2,
                   "--train-args=--base-c 4 --crop-size 48 --base-size 64 -b 2",
                   "--fast-args=--epochs 3 --eval-every 2", "--plot", png, "--json", out_json, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(out_json) as f:
        result = json.load(f)["samples"]
    rows = {row["recipe"]: row for row in result["table"]}
    assert rows["tutorial"]["epochs"] == 2 and rows["tutorial"]["validations"] == 2
    assert rows["fast"]["epochs"] == 3 and rows["fast"]["validations"] == 2
    for recipe, row in rows.items():
        points = result["runs"][recipe]["points"]
        assert row["final_dice"] == points[-1]["dice"] and 0 <= row["final_dice"] <= 1
        assert row["seconds"] == points[-1]["seconds"] > points[0]["seconds"] > 0
        assert row["process_s"] > row["seconds"]  # the process also started up
    assert "--recipe" in result["runs"]["fast"]["argv"] and "fast" in result["runs"]["fast"]["argv"]
    assert rows["tutorial"]["share_of_tutorial_time"] == pytest.approx(1.0)
    assert "| tutorial | 2 |" in r.stdout and "| fast | 3 |" in r.stdout
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300


def test_benchmark_precision_mode_times_each_configuration(tmp_path):
    out_json = tmp_path / "precision.json"
    r = run_script("benchmarks/benchmark.py", "--mode", "precision", "--rounds", 1, "--steps", 1, "-b", 1,
                   "--crop-size", 32, "--base-c", 4, "--opt", "adamw", "--json", out_json, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(out_json) as f:
        samples = json.load(f)["samples"]
    assert set(samples) == {"float32, NCHW", "float32, channels_last", "bfloat16, NCHW", "bfloat16, channels_last"}
    for config, (sample,) in samples.items():
        dtype, layout = config.split(", ")
        # Each process really trained as named: the logits' dtype under autocast, and their memory format.
        assert sample["logits"] == dtype and sample["channels_last"] == (layout == "channels_last"), config
        assert sample["step_s"] > 0
    rows = [line for line in r.stdout.splitlines() if line.startswith("| float32 |") or line.startswith("| bfloat16 |")]
    assert len(rows) == 4 and rows[0].startswith("| float32 | NCHW |") and "| 1.00x |" in rows[0]
    assert ("bfloat16 hardware (AMX or AVX512-BF16): " + ("yes" if cpu_has_native_bf16() else "no")) in r.stdout
