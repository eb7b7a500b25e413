"""Settings are decided once: every resolved value and its source, for each way a run can be started."""
import pytest

import train
from train_utils.errors import UserError
from train_utils.settings import (DEMO, DRIVE_MEAN, DRIVE_STD, RECIPES, SOURCES, TUTORIAL, Machine,
                                   resolve_settings)
from train_utils.synthetic import write_synthetic

CPU = Machine(default_device="cpu", cpu_bf16=False)
CPU_BF16 = Machine(default_device="cpu", cpu_bf16=True)
GPU = Machine(default_device="cuda", cpu_bf16=False)


def resolve(argv, machine=CPU, checkpoint=None):
    args = train.parse_args(train.get_args_parser(), [str(a) for a in argv])
    return resolve_settings(args, checkpoint, machine, train.dataset_facts)


def table(settings):
    return {k: (v, settings.source(k)) for k, v in settings.as_dict().items()}


def expected(*layers, **changes):
    """The plain tutorial run on DRIVE on a CPU without bfloat16 hardware, with ``layers`` (dicts, later ones
    winning) and then ``changes``."""
    want = {k: (v, "default") for k, v in TUTORIAL.items()}
    want.update(mean=(DRIVE_MEAN, "dataset"), std=(DRIVE_STD, "dataset"), fov=("masks", "dataset"),
                base_size=(565, "dataset"), crop_size=(480, "derived"), device=("cpu", "derived"),
                workers=(0, "derived"), channels_last=(False, "derived"), eval_channels_last=(True, "derived"))
    for layer in layers:
        want.update(layer)
    want.update(changes)
    if want["crop_first"] == (None, "default"):  # derived: crop-first sampling with a rotation
        want["crop_first"] = (want["rotate"][0] > 0, "derived")
    return want


def recipe(name, **changes):
    return {**{k: (v, "recipe") for k, v in RECIPES[name].items()}, **changes}


def typed(**values):
    return {k: (v, "flag") for k, v in values.items()}


def fast_checkpoint(**changes):
    """The ``args`` a checkpoint of a --recipe fast run stores (machine settings as asked for: amp None)."""
    ckpt = {k: v for k, v in TUTORIAL.items()}
    ckpt.update(RECIPES["fast"], base_c=32, crop_size=256, base_size=565, mean=list(DRIVE_MEAN),
                std=list(DRIVE_STD), recipe="fast", val_split=0, fov="masks")
    ckpt.update(changes)
    return ckpt


def test_plain_run_is_the_tutorials(drive_root):
    s = resolve(["--data-path", drive_root])
    assert table(s) == expected(data_path=(drive_root, "flag"))


def test_demo(drive_root):
    s = resolve(["--demo", "--data-path", drive_root])
    demo = {k: (v, "demo") for k, v in DEMO.items()}
    assert table(s) == expected(demo, typed(demo=True, data_path=drive_root))


def test_fast_recipe_without_bfloat16_hardware(drive_root):
    s = resolve(["--recipe", "fast", "--data-path", drive_root])
    assert table(s) == expected(recipe("fast"), typed(recipe="fast", data_path=drive_root),
                                amp=(False, "derived"), base_c=(16, "derived"))


def test_fast_recipe_with_bfloat16_hardware(drive_root):
    s = resolve(["--recipe", "fast", "--data-path", drive_root], machine=CPU_BF16)
    assert table(s) == expected(recipe("fast"), typed(recipe="fast", data_path=drive_root),
                                amp=(True, "derived"), amp_dtype=("bfloat16", "derived"), base_c=(32, "derived"),
                                channels_last=(True, "derived"))
    assert s.checkpoint_args()["amp"] is None  # resumed elsewhere, the machine decides again


def test_fast_recipe_with_demo_takes_the_demos_sizes(drive_root):
    s = resolve(["--recipe", "fast", "--demo", "--data-path", drive_root], machine=CPU_BF16)
    demo = {k: (v, "demo") for k, v in DEMO.items()}
    assert table(s) == expected(recipe("fast"), demo, typed(recipe="fast", demo=True, data_path=drive_root),
                                amp=(True, "derived"), amp_dtype=("bfloat16", "derived"),
                                channels_last=(True, "derived"))


def test_resume_of_a_fast_checkpoint_continues_it(drive_root):
    ckpt = fast_checkpoint(noise=0.05, skeleton_recall=1.0)  # the loss and the noise go on as they were
    s = resolve(["--resume", "ckpt.pth", "--data-path", drive_root], checkpoint=ckpt)
    carried = {k: (ckpt[k], "checkpoint") for k in ("model", "num_classes", "base_c", "mean", "std", "fov_diameter",
                                                       "fov_diameter_max", "dataset", "val_split", "val_seed",
                                                       "val_images", "fov")}
    run = {k: (ckpt[k], "checkpoint") for k in RECIPES["fast"] if k not in ("base_c", "amp")}
    assert table(s) == expected(carried, run, typed(resume="ckpt.pth", data_path=drive_root),
                                recipe=("fast", "checkpoint"), amp=(False, "derived"),
                                scale_range=(TUTORIAL["scale_range"], "checkpoint"), crop_size=(256, "checkpoint"),
                                noise=(0.05, "checkpoint"), skeleton_recall=(1.0, "checkpoint"))


def test_typed_recipe_flag_wins_over_the_checkpoint(drive_root):
    s = resolve(["--resume", "ckpt.pth", "--data-path", drive_root, "--no-eval-tta", "--epochs", 60],
                checkpoint=fast_checkpoint())
    assert (s.eval_tta, s.source("eval_tta")) == (False, "flag")
    assert (s.epochs, s.source("epochs")) == (60, "flag")
    assert (s.opt, s.source("opt")) == ("adamw", "checkpoint")


def test_test_only_of_a_width_16_checkpoint(drive_root):
    ckpt = {"model": "unet", "num_classes": 1, "base_c": 16, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2],
            "val_split": 3, "dataset": "drive"}
    s = resolve(["--test-only", "--weights", "best.pth", "--data-path", drive_root], checkpoint=ckpt)
    # Evaluation reads the test split: the held-out images and sizes of training do not apply.
    assert table(s) == expected(typed(test_only=True, resume="best.pth", data_path=drive_root),
                                base_c=(16, "checkpoint"), mean=([0.5, 0.4, 0.3], "checkpoint"),
                                std=([0.2, 0.2, 0.2], "checkpoint"), base_size=(None, "default"),
                                crop_size=(None, "default"), model=("unet", "checkpoint"),
                                num_classes=(1, "checkpoint"))


def test_a_typed_model_flag_that_contradicts_the_checkpoint_is_an_error(drive_root):
    with pytest.raises(UserError, match="--base-c 32 contradicts checkpoint 'best.pth', which was trained with "
                                        "base_c 16"):
        resolve(["--test-only", "--resume", "best.pth", "--base-c", 32, "--data-path", drive_root],
                checkpoint={"model": "unet", "num_classes": 1, "base_c": 16})
    with pytest.raises(UserError, match="--mean 0.1 0.2 0.3 contradicts"):
        resolve(["--resume", "ckpt.pth", "--mean", 0.1, 0.2, 0.3, "--data-path", drive_root],
                checkpoint=fast_checkpoint())


def test_tutorial_checkpoint_is_the_tutorials_model(drive_root):
    """The tutorial saved no model name or width: its model is the U-Net with base_c=32, mean/std the run's."""
    s = resolve(["--test-only", "--resume", "t.pth", "--data-path", drive_root],
                checkpoint={"num_classes": 1, "lr": 0.01, "amp": False})
    assert (s.base_c, s.source("base_c")) == (32, "checkpoint") and s.source("mean") == "dataset"


def test_chase_db1_takes_its_statistics_and_image_size(tmp_path):
    root = str(tmp_path / "chase")
    write_synthetic(root, "chase_db1", num_train=4, num_test=2, height=64, width=60, seed=0)
    s = resolve(["--dataset", "chase_db1", "--data-path", root, "--val-split", 1])
    spec = train.DATASETS["chase_db1"]
    held = s.val_images
    assert len(held) == 1 and held[0].startswith("Image_")
    assert table(s) == expected(typed(dataset="chase_db1", data_path=root, val_split=1),
                                mean=(spec.mean, "dataset"), std=(spec.std, "dataset"), fov=("estimate", "default"),
                                base_size=(60, "dataset"), crop_size=(60, "derived"), val_images=(held, "dataset"))


def test_gpu_machine(drive_root):
    s = resolve(["--data-path", drive_root, "--recipe", "fast"], machine=GPU)
    assert (s.device, s.amp, s.amp_dtype, s.base_c, s.channels_last) == ("cuda", True, "float16", 32, True)
    assert {s.source(k) for k in ("device", "amp", "amp_dtype", "base_c", "channels_last", "workers")} == {"derived"}


def test_pretrained_backbone_takes_imagenets_normalisation(drive_root):
    from src import IMAGENET_MEAN, IMAGENET_STD
    s = resolve(["--data-path", drive_root, "--model", "vgg16_unet", "--pretrained-backbone", "w.pth"])
    assert (s.mean, s.std, s.source("mean")) == (IMAGENET_MEAN, IMAGENET_STD, "derived")


def test_settings_are_read_only_and_printed_with_their_sources(drive_root):
    s = resolve(["--data-path", drive_root, "--lr", 0.02])
    with pytest.raises(AttributeError, match="decided once"):
        s.lr = 0.1
    text = s.describe()
    assert text.startswith("resolved settings:\n")
    assert "lr=0.02 (flag)" in text and "base_size=565 (dataset)" in text and "epochs=200 (default)" in text
    assert "crop_size=480 (derived)" in text
    assert {s.source(k) for k in s.as_dict()} <= set(SOURCES)


@pytest.mark.parametrize("argv,message", [
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "-5"], "--lr must be a finite number"),
    (["--rotate", "200"], "--rotate must be in"),
    (["--crop-size", "10"], "--crop-size 10 is smaller than the 16 pixels the unet model needs"),
    (["--model", "vgg16_unet", "--crop-size", "24"], "--crop-size 24 is smaller than the 32 pixels the vgg16_unet"),
    (["--recipe", "fast", "--crops-per-image", "0"], "--crops-per-image must be at least 1"),
    (["--noise", "-0.1"], "--noise must be in"),
    (["--skeleton-recall", "nan"], "--skeleton-recall must be a finite number"),
])
def test_impossible_values_are_refused(drive_root, argv, message):
    with pytest.raises(UserError, match=message):
        resolve(["--data-path", drive_root, *argv])


def test_val_images_names_the_held_out_images(drive_root):
    s = resolve(["--data-path", drive_root, "--val-images", "24_training.tif", "22_training.tif"])
    assert (s.val_images, s.source("val_images")) == (["24_training.tif", "22_training.tif"], "flag")
    assert s.val_split == 0
    with pytest.raises(UserError, match="--val-images: 99_training.tif not among the training images"):
        resolve(["--data-path", drive_root, "--val-images", "99_training.tif"])
    with pytest.raises(UserError, match="must leave at least one training image"):
        resolve(["--data-path", drive_root, "--val-images", *[f"{n}_training.tif" for n in range(21, 25)]])
    picked = resolve(["--data-path", drive_root, "--val-split", 2]).val_images
    other = [n for n in ["21_training.tif", "22_training.tif", "23_training.tif"] if n not in picked][:2]
    with pytest.raises(UserError, match="give only one of --val-split and --val-images"):
        resolve(["--data-path", drive_root, "--val-split", 2, "--val-images", *other])


def test_val_images_validate_on_exactly_those_images(drive_root, tmp_path):
    out = tmp_path / "run"
    args = train.parse_args(train.get_args_parser(), [str(a) for a in (
        "--data-path", drive_root, "--output-dir", out, "--val-images", "23_training.tif", "--epochs", 1,
        "--base-c", 4, "--crop-size", 48, "--base-size", 64, "-b", 2, "--device", "cpu", "--no-plots")])
    train.main(args)
    import torch
    saved = torch.load(out / "checkpoint.pth", weights_only=True)["args"]
    assert saved["val_images"] == ["23_training.tif"]


def test_checkpoints_of_earlier_versions_resume(drive_root):
    """Their ``args`` said "where it is faster" as amp "auto" and carried in_channels/bilinear: both still load."""
    old = fast_checkpoint(amp="auto", in_channels=3, bilinear=True)
    for machine, amp in ((CPU, False), (CPU_BF16, True)):
        s = resolve(["--resume", "ckpt.pth", "--data-path", drive_root], machine=machine, checkpoint=old)
        assert (s.amp, s.source("amp")) == (amp, "derived") and s.base_c == 32
