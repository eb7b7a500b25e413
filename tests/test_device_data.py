"""Training batches made on the device (train_utils/device_data.py, --data-on-device): the same crops as the
crop-first per-sample pipeline for a seed, labels on their images, the ignore value kept; and train.py with it."""
import json
import os

import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, RandomSampler, SequentialSampler

from my_dataset import RepeatDataset, SameSizeBatchSampler, VesselDataset, dataset_files
from tests.conftest import run_script
from train_utils.device_data import (DeviceBatches, DeviceLoader, fits_on, sample_bilinear_batch,
                                     sample_nearest_batch, validation_on)
from train_utils.metrics import IGNORE_INDEX
from train_utils.synthetic import write_synthetic_drive
from train_utils.transforms import affine_crop_map, get_transform, sample_bilinear, sample_nearest


@pytest.fixture(scope="module")
def two_sizes(tmp_path_factory):
    """Training samples of two synthetic DRIVE-format sets of different sizes."""
    roots = []
    for k, (h, w) in enumerate(((150, 140), (120, 170))):
        root = str(tmp_path_factory.mktemp(f"set{k}"))
        write_synthetic_drive(root, num_train=4, num_test=1, height=h, width=w, seed=k)
        roots.append(dataset_files("drive", root, "training"))
    return roots


def datasets(samples, **preset):
    """A ConcatDataset of one VesselDataset per sample list (the second seen twice an epoch), crop-first."""
    parts = []
    for k, s in enumerate(samples):
        ds = VesselDataset(s, get_transform(True, base_size=140, crop_size=112, crop_first=True, **preset))
        parts.append(RepeatDataset(ds, 2) if k else ds)
    return ConcatDataset(parts)


@pytest.mark.parametrize("preset", [{}, {"rotate": 90.0, "color_jitter": 0.2}])
def test_the_same_crops_as_the_crop_first_loader_for_a_seed(two_sizes, preset):
    data = datasets(two_sizes, **preset)
    torch.manual_seed(3)
    expected = list(DataLoader(data, batch_size=4, sampler=RandomSampler(data), num_workers=0,
                               collate_fn=VesselDataset.collate_fn))
    torch.manual_seed(3)
    loader = DeviceLoader(data, RandomSampler(data), 4, "cpu")
    got = list(loader)
    assert len(got) == len(expected) == len(loader) == 3  # 12 items in batches of 4
    for (img, target), (dev_img, dev_target) in zip(expected, got):
        assert dev_img.shape == img.shape and dev_img.dtype == torch.float32 and dev_target.dtype == torch.int64
        assert torch.allclose(dev_img, img, atol=1e-3), (dev_img - img).abs().max()
        assert torch.equal(dev_target, target)
    # scales down to half of the base size leave parts of some crops beyond their image: ignored there
    assert any((t == IGNORE_INDEX).any() for _, t in got)


def test_batched_sampling_keeps_labels_on_their_images():
    # A source whose pixel (y, x) holds y in its first channel, x in its second and, in the label, a class of
    # its own per 10 x 10 block: after any map, the image's coordinates at a label pixel's centre lie in the
    # block the label took: the label is the source pixel whose area holds the point the image was read at.
    h, w = 60, 80
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    image = torch.stack([yy, xx, torch.zeros_like(yy)]).to(torch.uint8)[None]
    target = ((yy // 10) * 8 + xx // 10).to(torch.uint8)[None]
    draws = ((60, 80, 0, False, False, 5, 7), (90, 120, 33.0, True, False, 20, 30), (45, 60, 71.0, False, True, 0, 0))
    maps = [affine_crop_map(h, w, *draw) for draw in draws]
    for m in maps:
        got = sample_bilinear_batch(image, [m], 40)[0]
        label = sample_nearest_batch(target, [m], [(h, w)], 40)[0]
        inside = (label != IGNORE_INDEX) & (got[0] > 0.5) & (got[0] < h - 1.5) & (got[1] > 0.5) & (got[1] < w - 1.5)
        assert inside.sum() > 400
        y, x = got[0][inside], got[1][inside]
        block = ((y + 0.5).floor().long() // 10) * 8 + (x + 0.5).floor().long() // 10
        assert torch.equal(label[inside].long(), block)
        # the one-window samplers of the per-sample path read the same
        assert torch.allclose(got, sample_bilinear(image[0], m, 40), atol=1e-3)
        assert torch.equal(label, sample_nearest(target[0], m, 40))


def test_noise_runs_on_the_device_and_touches_the_image_only(two_sizes):
    data = datasets(two_sizes[:1], noise=0.1)
    torch.manual_seed(0)
    img, target = next(iter(DeviceLoader(data, RandomSampler(data), 4, "cpu")))
    assert torch.isfinite(img).all() and set(target.unique().tolist()) <= {0, 1, IGNORE_INDEX}
    assert fits_on(data, "cpu")


def last_record(out):
    with open(out / "log.jsonl") as f:
        return json.loads(f.read().splitlines()[-1])


def test_validation_batches_kept_on_the_device_are_the_loaders(two_sizes):
    # two sizes of image in batches of one size, as train.py's validation loader makes them
    data = ConcatDataset([VesselDataset(samples, get_transform(False)) for samples in two_sizes])
    data.img_list = [s for samples in two_sizes for s in samples]
    shapes = [tuple(data[i][0].shape) for i in range(len(data))]
    loader = DataLoader(data, batch_sampler=SameSizeBatchSampler(SequentialSampler(data), shapes, 3),
                        collate_fn=VesselDataset.collate_fn)
    kept = validation_on(loader, "cpu")
    assert isinstance(kept, DeviceBatches) and kept.dataset is data and kept.batch_sampler is loader.batch_sampler
    expected, got = list(loader), list(kept)
    assert len(got) == len(expected) == len(kept) == 4  # 4 and 4 images of two sizes, 3 a batch
    for (img, target), (kept_img, kept_target) in zip(expected, got):
        assert torch.equal(kept_img, img) and torch.equal(kept_target, target)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(kept, got))  # a second epoch's batches alike


@pytest.mark.cuda
def test_batches_are_made_without_waiting_for_the_gpu(two_sizes):
    from tests.conftest import sync_debug_error
    data = datasets(two_sizes, rotate=90.0)
    torch.manual_seed(0)
    loader = DeviceLoader(data, RandomSampler(data), 4, "cuda")
    with sync_debug_error():
        batches = list(loader)
    assert len(batches) == 3 and all(img.is_cuda and target.is_cuda for img, target in batches)


def test_train_py_with_batches_made_on_the_device(tmp_path):
    root = tmp_path / "data"
    write_synthetic_drive(str(root), num_train=8, num_test=2, height=96, width=92, seed=0)
    common = ["--data-path", root, "--epochs", "1", "--base-c", "8", "--crop-size", "64", "--base-size", "92",
              "--device", "cpu", "--workers", "0", "--seed", "0", "--no-plots"]
    r = run_script("train.py", *common, "--data-on-device", "--val-batch-size", "2", "--output-dir", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "training batches are made on cpu from its copy of the training images" in r.stdout
    assert "the validation images are preprocessed once and kept on cpu" in r.stdout
    assert os.path.exists(tmp_path / "out" / "best_model.pth")
    # The same crops as the loader's crop-first path: the same training, up to the resample's rounding
    r = run_script("train.py", *common, "--crop-first", "--output-dir", tmp_path / "loader")
    assert r.returncode == 0, r.stderr
    device, loader = (last_record(tmp_path / name) for name in ("out", "loader"))
    assert device["train_loss"] == pytest.approx(loader["train_loss"], rel=1e-5)
    assert device["auc"] == pytest.approx(loader["auc"], abs=1e-4)
    r = run_script("train.py", *common, "--data-on-device", "--no-crop-first", "--output-dir", tmp_path / "bad")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == ("error: --data-on-device samples each crop in one resample "
                                                 "(crop-first): drop --no-crop-first")


def test_gpu_speed_prints_each_paths_lines(tmp_path):
    # The GPU benchmark's lines, here on the CPU with a tiny model: every training path and prediction run
    root = tmp_path / "data"
    write_synthetic_drive(str(root), num_train=4, num_test=2, height=96, width=92, seed=0)
    out = tmp_path / "runs"
    r = run_script("benchmarks/gpu_speed.py", "--data-path", root, "--device", "cpu", "--epochs", 2, "--photos", 5,
                   "--train-args=--base-c 4 --crop-size 48 --base-size 92 -b 2", "--out", out,
                   "--json", tmp_path / "speed.json")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    with open(tmp_path / "speed.json") as f:
        numbers = json.load(f)
    for path, flags in (("tutorial", "train.py defaults"), ("device", "--data-on-device --val-batch-size 20"),
                        ("device-bf16", "--data-on-device --val-batch-size 20 --amp --amp-dtype bfloat16")):
        record = last_record(out / f"train-{path}")
        assert f"2 epochs: {record['elapsed']:.1f} s, dice {record['dice']:.4f}  ({path}: {flags})" in lines
        assert f"GPU busy: n/a (no nvidia-smi)  ({path})" in lines
        profile = next(t for t in numbers["train"] if t["path"] == path)
        assert 0 < profile["training"] + profile["validation"] <= profile["epoch"] + 0.05
        assert 0 <= profile["data_wait"] <= profile["training"]
    for name, flags in (("tutorial", "predict.py defaults"), ("batched", "--batch-size 8 --workers 4")):
        assert any(line.startswith("predict: ") and line.endswith(f"photographs/s  ({name}: {flags})")
                   for line in lines)
        assert len(os.listdir(out / f"predict-{name}")) >= 5  # a mask per photograph (and the run's records)
    assert sum(line.startswith("profile (") for line in lines) == 3
