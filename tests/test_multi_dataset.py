"""Training on several datasets at once, the FOV-diameter scale normalisation, and the shipped model."""
import collections
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from my_dataset import BalancedSampler, VesselDataset, dataset_files
from tests.conftest import ROOT, TINY_TRAIN, run_script
from train_utils import cli
from train_utils.checkpoint import load_checkpoint, safe_load
from train_utils.errors import UserError
from train_utils.imaging import fov_diameter, load_sample
from train_utils.inference import probabilities_at
from train_utils.metrics import IGNORE_INDEX
from train_utils.synthetic import synthetic_fundus, write_synthetic
from train_utils.transforms import get_transform, rescale

# ---------------------------------------------------------------------------
# balanced sampling


def test_balanced_sampler_gives_every_dataset_an_equal_share_without_early_repeats():
    sizes = [20, 4, 6]
    offsets = np.cumsum([0] + sizes)
    sampler = BalancedSampler(sizes, seed=3)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        drawn = list(sampler)
        epochs.append(drawn)
        assert len(drawn) == len(sampler) == 30
        per_dataset = [[i - offsets[d] for i in drawn if offsets[d] <= i < offsets[d + 1]] for d in range(3)]
        assert [len(p) for p in per_dataset] == [10, 10, 10]
        for size, items in zip(sizes, per_dataset):
            counts = collections.Counter(items)
            # Whole permutations first: an item comes again only once all of its dataset's have come.
            assert max(counts.values()) - min(counts[i] for i in range(size)) <= 1 if len(items) >= size \
                else max(counts.values()) == 1
    assert epochs[0] != epochs[1]  # a new order every epoch ...
    sampler.set_epoch(1)
    assert list(sampler) == epochs[1]  # ... and the same order for the same epoch and seed


def test_balanced_sampler_splits_an_epoch_between_processes():
    full = BalancedSampler([7, 3], seed=0)
    ranks = [list(BalancedSampler([7, 3], seed=0, rank=r, world_size=3)) for r in range(3)]
    assert all(len(r) == len(full) // 3 == 3 for r in ranks)
    expected = list(full)[:9]
    assert sorted(sum(ranks, [])) == sorted(expected)
    assert ranks[1] == expected[1::3]


# ---------------------------------------------------------------------------
# the FOV's diameter and the rescaling


def disc(height, width, cy, cx, radius):
    yy, xx = np.mgrid[0:height, 0:width]
    return (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= radius ** 2


@pytest.mark.parametrize("radius", [40.0, 100.0, 313.5])
def test_fov_diameter_of_whole_and_clipped_circles(radius):
    size = int(2 * radius + 20)
    whole = disc(size, size, size / 2, size / 2, radius)
    assert fov_diameter(whole) == pytest.approx(2 * radius, abs=1.5)
    # Cut at the top and bottom (most cameras) and at one side too (STARE): the same circle.
    cut = whole[int(0.2 * size):int(0.85 * size), int(0.12 * size):]
    assert fov_diameter(cut) == pytest.approx(2 * radius, abs=2.0)
    assert fov_diameter(np.ones((30, 50), dtype=bool)) == 50  # no edge: the image's width


def test_rescale_round_trip_keeps_sizes_classes_and_smooth_probabilities():
    img = torch.randint(0, 256, (3, 61, 47), dtype=torch.uint8)
    target = torch.randint(0, 2, (61, 47), dtype=torch.uint8)
    target[:5] = IGNORE_INDEX
    for scale in (0.37, 1.0, 2.5):
        small, small_target = rescale(img, scale, target)
        assert small.shape == (3, round(61 * scale), round(47 * scale)) and small.dtype == torch.uint8
        assert small_target.shape == small.shape[1:]
        assert set(small_target.unique().tolist()) <= {0, 1, IGNORE_INDEX}  # nearest: no blended classes
        # Probabilities made at the rescaled size come back at the photograph's own size, still distributions.
        yy, xx = torch.meshgrid(torch.linspace(0, 1, small.shape[1]), torch.linspace(0, 1, small.shape[2]),
                                indexing="ij")
        p = torch.stack([0.2 + 0.6 * xx * yy, 0.8 - 0.6 * xx * yy])[None]
        back = probabilities_at(p, (61, 47))
        assert back.shape == (1, 2, 61, 47)
        assert torch.allclose(back.sum(1), torch.ones(1, 61, 47), atol=1e-6)
        # A smooth field survives the round trip: compare with the formula at the output's pixel centres.
        v = (torch.arange(61) + 0.5) / 61
        u = (torch.arange(47) + 0.5) / 47
        assert torch.allclose(back[0, 0], 0.2 + 0.6 * v[:, None] * u[None], atol=0.6 * 2 / min(small.shape[1:]) + 1e-5)


def test_fov_scaled_dataset_resizes_photographs_and_keeps_validation_labels_at_their_size(tmp_path):
    write_synthetic(str(tmp_path), "chase_db1", 2, 0, height=96, width=100, seed=0)
    samples = dataset_files("chase_db1", str(tmp_path), "training")
    img, target = load_sample(samples[0].image, samples[0].label, None)
    scale = 60 / fov_diameter(target != IGNORE_INDEX)
    tf = get_transform(False)
    val = VesselDataset(samples, tf, fov_diameter=60, resize_target=False)
    image, label = val[0]
    assert image.shape[1:] == (round(96 * scale), round(100 * scale))
    assert label.shape == (96, 100) and torch.equal(label, torch.from_numpy(target).long())
    train = VesselDataset(samples, None, fov_diameter=60)
    image, label = train[0]
    assert image.shape[1:] == label.shape == (round(96 * scale), round(100 * scale))
    assert fov_diameter(label.numpy() != IGNORE_INDEX) == pytest.approx(60, abs=2)


# ---------------------------------------------------------------------------
# train.py on several datasets


@pytest.fixture(scope="module")
def three_datasets(tmp_path_factory):
    base = tmp_path_factory.mktemp("three")
    roots = {}
    for name, (num_train, num_test) in {"drive": (4, 2), "chase_db1": (6, 2), "stare": (10, 2)}.items():
        roots[name] = str(base / name)
        write_synthetic(roots[name], name, num_train, num_test, height=64, width=60, seed=2)
    return roots


def test_training_on_three_datasets_reports_each_and_their_mean(three_datasets, tmp_path):
    out = tmp_path / "run"
    r = run_script("train.py", "--dataset", *three_datasets, "--data-path", *three_datasets.values(),
                   "--val-split", "0", "2", "3", "--fov-diameter", "48", "--epochs", "1", "--output-dir", out,
                   "--no-plots", *TINY_TRAIN)
    assert r.returncode == 0, r.stderr
    assert "training draws equally from drive (4 images), chase_db1 (4 images), stare (7 images)" in r.stdout
    dices = [float(d) for d in re.findall(r"^dice coefficient: ([0-9.]+)$", r.stdout, re.M)]
    assert len(dices) == 3
    mean = re.search(r"^mean dice coefficient over the 3 datasets \(drive, chase_db1, stare\): ([0-9.]+)$",
                     r.stdout, re.M)
    assert float(mean.group(1)) == pytest.approx(np.mean(dices), abs=1.5e-3)
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert list(record["datasets"]) == ["drive", "chase_db1", "stare"]
    assert [round(record["datasets"][n]["dice"], 3) for n in record["datasets"]] == dices
    assert record["dice"] == pytest.approx(np.mean([d["dice"] for d in record["datasets"].values()]))
    saved = load_checkpoint(str(out / "checkpoint.pth"))["args"]
    assert saved["fov_diameter"] == 48 and saved["dataset"] == ["drive", "chase_db1", "stare"]
    # 2 of chase_db1's 6 training photographs and 3 of stare's 10 held out; drive validated on its test split.
    assert len(saved["val_images"]) == 5 and not any(n.endswith("_training.tif") for n in saved["val_images"])

    # --test-only: every dataset's test split, a CSV with a dataset column and a pooled row each.
    r = run_script("train.py", "--dataset", *three_datasets, "--data-path", *three_datasets.values(), "--test-only",
                   "--resume", out / "checkpoint.pth", "--output-dir", tmp_path / "eval", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    rows = [line.split(",")[:2] for line in (tmp_path / "eval" / "test_metrics.csv").read_text().splitlines()]
    assert rows[0] == ["dataset", "image"]
    for name in three_datasets:
        mine = [image for dataset, image in rows[1:] if dataset == name]
        assert mine == [os.path.basename(s.image) for s in dataset_files(name, three_datasets[name], "test")] + ["pooled"]

    # predict.py rescales a photograph of another size for the model, and writes the mask at the photograph's size.
    img, _, _ = synthetic_fundus(150, 170, seed=4)
    Image.fromarray(img).save(tmp_path / "photo.png")
    r = run_script("predict.py", "--weights", out / "checkpoint.pth", "--img", tmp_path / "photo.png",
                   "--output-dir", tmp_path / "pred", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "pred" / "photo.png").size == (170, 150)

    # export.py --format pth: the model alone in float16, without the training machine's folders; it predicts
    # the same mask.
    r = run_script("export.py", "--weights", out / "checkpoint.pth", "--format", "pth", "--output", tmp_path / "m.pth")
    assert r.returncode == 0, r.stderr
    half = safe_load(str(tmp_path / "m.pth"))
    assert set(half) == {"model", "args", "epoch", "best_dice"} and "data_path" not in half["args"]
    assert half["args"]["fov_diameter"] == 48
    assert {v.dtype for v in half["model"].values()} <= {torch.float16, torch.int64}
    r = run_script("predict.py", "--weights", tmp_path / "m.pth", "--img", tmp_path / "photo.png",
                   "--output-dir", tmp_path / "pred16", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    a, b = (np.array(Image.open(tmp_path / d / "photo.png")) for d in ("pred", "pred16"))
    assert (a != b).mean() < 0.01


def test_val_images_and_val_split_combine_across_datasets(three_datasets):
    """DRIVE's archive has no held-out split of its training images: --val-images names DRIVE's, while
    --val-split holds out a seeded choice of the others (0: DRIVE's own count)."""
    import train
    from train_utils.settings import Machine, resolve_settings

    named = [os.path.basename(t.image) for t in dataset_files("drive", three_datasets["drive"], "training")][1::2]
    argv = ["--dataset", *three_datasets, "--data-path", *three_datasets.values(), "--val-split", "0", "2", "3",
            "--val-images", *named]
    args = train.parse_args(train.get_args_parser(), argv)
    s = resolve_settings(args, None, Machine("cpu", False), train.dataset_facts)
    train_parts, val_parts = train.build_datasets(s)
    held = {name: [os.path.basename(p) for p in ds.img_list] for name, ds in val_parts}
    assert held["drive"] == named and len(named) == 2
    assert len(held["chase_db1"]) == 2 and len(held["stare"]) == 3
    for (name, tr), (_, val) in zip(train_parts, val_parts):
        assert not set(tr.img_list) & set(val.img_list)
        assert len(tr) + len(val) == len(dataset_files(name, three_datasets[name], "training"))


@pytest.mark.parametrize("extra, message", [
    (["--data-path", "a"], r"--data-path needs one folder per --dataset: got 2 dataset\(s\) and 1 folder\(s\)"),
    (["--data-path", "a", "b", "--val-split", "1", "2", "3"], r"--val-split takes one N, or one per dataset \(2\); got 3"),
    (["--data-path", "a", "a", "--dataset", "stare", "stare"], "--dataset/--data-path names the same dataset twice"),
])
def test_several_datasets_need_matching_flags(extra, message):
    argv = ["--dataset", "drive", "stare"] + extra
    r = run_script("train.py", *argv, "--epochs", "1", "--output-dir", "/nonexistent/never-made")
    assert r.returncode != 0
    assert re.fullmatch("error: " + message, r.stderr.strip()), r.stderr


# ---------------------------------------------------------------------------
# the shipped model


def test_shipped_model_is_small_and_loads_as_plain_data():
    assert os.path.getsize(cli.SHIPPED_WEIGHTS) <= 20 * 2 ** 20
    ckpt = safe_load(cli.SHIPPED_WEIGHTS)  # weights_only=True
    args = ckpt["args"]
    assert args["dataset"] == ["drive", "chase_db1", "stare", "hrf"]
    assert 0 < args["fov_diameter"] < args["fov_diameter_max"]  # high-resolution photographs keep detail
    # Trained for thin vessels and noisy cameras, and read at a threshold above the more likely class.
    assert args["skeleton_recall"] > 0 and args["noise"] > 0 and 0.5 < args["vessel_threshold"] < 1
    assert "optimizer" not in ckpt
    assert all(v.dtype in (torch.float16, torch.int64) for v in ckpt["model"].values())


def test_predict_without_weights_uses_the_shipped_model(tmp_path):
    """The first command after installing: no --weights, no trained model in the folder."""
    img, _, _ = synthetic_fundus(120, 130, seed=5)
    Image.fromarray(img).save(tmp_path / "photo.jpg")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"), "--img", "photo.jpg", "--output-dir", "out"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "no --weights given: using the shipped model" in r.stdout
    mask = np.array(Image.open(tmp_path / "out" / "photo.png"))
    assert mask.shape == (120, 130) and set(np.unique(mask)) <= {0, 255}


def test_torch_hub_loads_the_shipped_model():
    model = torch.hub.load(ROOT, "unet_vessels", source="local")
    assert not model.training
    assert len(model.mean) == len(model.std) == 3 and 0 < model.fov_diameter < model.fov_diameter_max
    assert model.vessel_threshold == safe_load(cli.SHIPPED_WEIGHTS)["args"]["vessel_threshold"]
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 80))["out"]
    assert out.shape == (1, 2, 64, 80)
    assert math.isfinite(out.abs().max().item())


def test_torch_hub_loads_the_shipped_artery_vein_model():
    model = torch.hub.load(ROOT, "unet_av", source="local")
    saved = safe_load(cli.SHIPPED_AV_WEIGHTS)["args"]
    assert not model.training and saved["dataset"][:2] == ["drive_av", "hrf_av"] and saved["num_classes"] == 2
    assert model.vessel_threshold == saved["vessel_threshold"] and 0 < model.fov_diameter < model.fov_diameter_max
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 80))["out"]
    assert out.shape == (1, 3, 64, 80) and math.isfinite(out.abs().max().item())
    assert os.path.getsize(cli.SHIPPED_AV_WEIGHTS) < 20e6


@pytest.mark.parametrize("content", [None, b"not a checkpoint at all" * 10])
def test_missing_or_corrupt_shipped_model_is_a_clear_error(tmp_path, monkeypatch, content):
    path = tmp_path / "unet_vessels.pth"
    if content is not None:
        path.write_bytes(content)
    monkeypatch.setattr(cli, "SHIPPED_WEIGHTS", str(path))
    spec = importlib.util.spec_from_file_location("hubconf", os.path.join(ROOT, "hubconf.py"))
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    with pytest.raises(UserError, match=re.escape(str(path))):
        hubconf.unet_vessels()


def test_export_exports_the_shipped_model(tmp_path):
    r = run_script("export.py", "--weights", cli.SHIPPED_WEIGHTS, "--format", "pt2", "--output", tmp_path / "m.pt2")
    assert r.returncode == 0, r.stderr
    assert "the model expects photographs resized so that their field of view is" in r.stdout
    assert "or kept at their own scale up to" in r.stdout
    extra = {"model.json": ""}
    torch.export.load(str(tmp_path / "m.pt2"), extra_files=extra)
    meta = json.loads(extra["model.json"])
    saved = safe_load(cli.SHIPPED_WEIGHTS)["args"]
    assert meta["fov_diameter"] == saved["fov_diameter"] > 0
    assert meta["fov_diameter_max"] == saved["fov_diameter_max"] > saved["fov_diameter"]
    assert meta["vessel_threshold"] == saved["vessel_threshold"]
    assert f"exceeds {saved['vessel_threshold']:g}" in r.stdout
