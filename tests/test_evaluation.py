"""``evaluation.validate`` against plain per-image loops written from the formulas: dice, confusion counts,
vessel metrics, per-image rows at any batch size and under DDP, flips, tiles, the printed block and the CSV."""
import contextlib
import csv
import io
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from my_dataset import VesselDataset, drive_files
from src import UNet
from tests.conftest import spread_output
from tests.test_skeleton import loop_counts
from train_utils.distributed_utils import ShardedEvalSampler
from train_utils.evaluation import (TEST_METRICS_COLUMNS, DatasetResults, ValidationResult, validate,
                                   write_test_metrics)
from train_utils.inference import inference_model, predict_probabilities
from train_utils.metrics import format_metrics
from train_utils.skeleton import cldice
from train_utils.transforms import get_transform

EPS = 1e-6
CPU = torch.device("cpu")


def tiny_model(images, num_classes=2, seed=0):
    """A U-Net of width 4 with BatchNorm statistics that are not the identity (so folding them is exercised)
    and an output layer spread so that its classes split the pixels."""
    torch.manual_seed(seed)
    model = UNet(in_channels=3, num_classes=num_classes, base_c=4).train()
    with torch.no_grad():
        for _ in range(3):
            model(images + 0.3 * torch.randn_like(images))
    return spread_output(model, images).eval()


@pytest.fixture(scope="module")
def dataset(drive_root):
    return VesselDataset(drive_files(drive_root, "test"), get_transform(False))


@pytest.fixture(scope="module")
def images(dataset):
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def loader_of(dataset, batch_size=1, sampler=None):
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=VesselDataset.collate_fn)


# ---------------------------------------------------------------------------
# the plain loop


def loop_dice(pred, target, num_classes):
    """One image: mean over the foreground classes of d = (2 I + eps) / (S_x + S_t + eps) over the pixels that
    are not 255, with S_x + S_t == 0 giving 2 I (so d = 1)."""
    valid = target != 255
    dices = []
    for c in range(1, num_classes):
        x, t = (pred == c) & valid, (target == c) & valid
        inter, sets = float((x & t).sum()), float(x.sum() + t.sum())
        dices.append((2 * inter + EPS) / ((sets if sets else 2 * inter) + EPS))
    return sum(dices) / len(dices)


def loop_confusion(pred, target, n):
    """Pixel counts: row = target class, column = predicted class; targets outside [0, n) are not counted."""
    mat = np.zeros((n, n), dtype=np.int64)
    for a, b in zip(target.flatten().tolist(), pred.flatten().tolist()):
        if 0 <= a < n:
            mat[a, b] += 1
    return mat


def loop_vessel(fg, pred, target):
    """Vessel (class != 0) metrics over the pixels that are not 255: ratios of the pixel counts, and the AUC as
    the fraction of (vessel, background) pairs in which the vessel pixel scores higher, ties counting 1/2."""
    valid = target != 255
    p, g, s = (pred != 0)[valid], (target != 0)[valid], fg[valid].double()
    tp, fp = int((p & g).sum()), int((p & ~g).sum())
    tn, fn = int((~p & ~g).sum()), int((~p & g).sum())
    pos, neg = s[g][:, None], s[~g][None, :]
    auc = float(((pos > neg).double().sum() + 0.5 * (pos == neg).double().sum()) / (pos.numel() * neg.numel()))
    return {"sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp), "accuracy": (tp + tn) / (tp + tn + fp + fn),
            "f1": 2 * tp / (2 * tp + fp + fn), "auc": auc}


def image_centreline(pred, target):
    """The four centreline counts of one image, by the pixel loops of tests/test_skeleton.py."""
    p, t = pred.numpy(), target.numpy()
    return loop_counts(p != 0, t != 0, t != 255)


def plain_validation(outputs, targets, num_classes):
    """(confusion counts, mean per-image dice, pooled vessel metrics, per-image rows) of per-image outputs."""
    preds = [o.argmax(0) for o in outputs]
    fgs = [1.0 - o.softmax(0)[0] for o in outputs]
    mat = sum(loop_confusion(p, t, num_classes) for p, t in zip(preds, targets))
    centrelines = [image_centreline(p, t) for p, t in zip(preds, targets)]
    rows = [{"dice": loop_dice(p, t, num_classes), **loop_vessel(f, p, t), **cldice(c)}
            for p, f, t, c in zip(preds, fgs, targets, centrelines)]
    pooled = loop_vessel(torch.cat([f.flatten() for f in fgs]), torch.cat([p.flatten() for p in preds]),
                         torch.cat([t.flatten() for t in targets]))
    pooled.update(cldice([sum(c[k] for c in centrelines) for k in range(4)]))
    return mat, float(np.mean([r["dice"] for r in rows])), pooled, rows


def assert_matches(result, reference, names):
    mat, dice, vessel, rows = reference
    assert np.array_equal(result.confmat.mat.numpy(), mat)
    assert result.dice == pytest.approx(dice, abs=1e-6)
    assert result.vessel == pytest.approx(vessel, abs=1e-9)
    assert [name for name, _ in result.rows] == names
    for (_, got), want in zip(result.rows, rows):
        assert got == pytest.approx(want, abs=1e-6)


def image_names(dataset):
    return [os.path.basename(p) for p in dataset.img_list]


# ---------------------------------------------------------------------------
# validate


@pytest.mark.parametrize("num_classes,channels_last", [(2, True), (2, False), (3, True)])
def test_validate_matches_the_plain_loop(dataset, images, num_classes, channels_last):
    model = tiny_model(images, num_classes)
    result = validate(model, loader_of(dataset), CPU, num_classes, channels_last=channels_last, per_image=True)
    folded = inference_model(model, channels_last)
    with torch.no_grad():
        outputs = []
        for i in range(len(dataset)):
            x = dataset[i][0][None]
            x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            outputs.append(folded(x)["out"][0])
    assert_matches(result, plain_validation(outputs, [dataset[i][1] for i in range(len(dataset))], num_classes),
                   image_names(dataset))
    assert 0 < result.dice < 1 and 0 < result.vessel["auc"] < 1  # the model predicts both classes


@pytest.mark.parametrize("tta,tile_size", [(False, 0), (True, 0), (False, 32), (True, 32)])
def test_batch_size_does_not_change_the_result(dataset, images, tta, tile_size):
    model = tiny_model(images)
    one, two = (validate(model, loader_of(dataset, batch_size=b), CPU, 2, tta=tta, tile_size=tile_size,
                         per_image=True) for b in (1, 2))
    assert torch.equal(one.confmat.mat, two.confmat.mat)
    assert two.dice == pytest.approx(one.dice, abs=1e-6)
    assert two.vessel == pytest.approx(one.vessel, abs=1e-6)
    assert [name for name, _ in one.rows] == [name for name, _ in two.rows] == image_names(dataset)
    for (_, a), (_, b) in zip(one.rows, two.rows):
        assert b == pytest.approx(a, abs=1e-5)


def test_tta_scores_the_flip_averaged_probabilities(dataset, images):
    model = tiny_model(images)
    result = validate(model, loader_of(dataset), CPU, 2, tta=True, channels_last=False, per_image=True)
    folded = inference_model(model, channels_last=False)
    with torch.no_grad():
        outputs = []
        for i in range(len(dataset)):
            x = dataset[i][0][None]
            p = (folded(x)["out"].softmax(1) + folded(x.flip(3))["out"].softmax(1).flip(3)
                 + folded(x.flip(2))["out"].softmax(1).flip(2)) / 3
            outputs.append(p[0].clamp_min(1e-30).log())
    assert_matches(result, plain_validation(outputs, [dataset[i][1] for i in range(len(dataset))], 2),
                   image_names(dataset))
    plain = validate(model, loader_of(dataset), CPU, 2, channels_last=False)
    assert abs(result.dice - plain.dice) > 1e-4  # the flips changed the prediction: the test can tell them apart


def test_images_larger_than_the_tile_are_predicted_in_tiles(dataset, images):
    model = tiny_model(images)
    assert max(images.shape[-2:]) > 32
    tiled = validate(model, loader_of(dataset), CPU, 2, tile_size=32, per_image=True)
    whole = validate(model, loader_of(dataset), CPU, 2, tile_size=0, per_image=True)
    folded = inference_model(model, channels_last=True)
    probs, tiles = predict_probabilities(folded, images, None, None, tile_size=32, tile_overlap=128, multiple=16,
                                         channels_last=True)
    assert tiles > 1
    outputs = list(probs.clamp_min(torch.finfo(torch.float32).tiny).log())
    assert_matches(tiled, plain_validation(outputs, [dataset[i][1] for i in range(len(dataset))], 2),
                   image_names(dataset))
    assert not torch.equal(tiled.confmat.mat, whole.confmat.mat)  # really tiled: differs from the whole-image pass
    assert validate(model, loader_of(dataset), CPU, 2, tile_size=64).dice == whole.dice  # fits in one tile


def test_rows_only_when_asked_and_report_prints_the_block(dataset, images):
    result = validate(tiny_model(images), loader_of(dataset), CPU, 2)
    assert result.rows is None
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result.report()
    assert out.getvalue() == f"{result.confmat}\ndice coefficient: {result.dice:.3f}\n{format_metrics(result.vessel)}\n"
    assert out.getvalue().startswith("global correct: ")
    with pytest.raises(ValueError, match="per_image=True"):
        write_test_metrics(".", result)


def test_write_test_metrics_csv(tmp_path):
    vessel = {"sensitivity": 0.5, "specificity": 0.25, "accuracy": 1 / 3, "f1": 0.125, "auc": float("nan"),
              "cl_recall": 0.875, "cl_precision": 0.5, "cldice": 7 / 11}
    rows = [("01_test.tif", {"dice": 0.75, **vessel}), ("02_test.tif", {"dice": 2 / 3, **vessel})]
    result = ValidationResult(confmat=None, dice=0.7, vessel=vessel, rows=rows)
    path = write_test_metrics(str(tmp_path), result, dataset="drive")
    assert path == str(tmp_path / "test_metrics.csv")
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    assert lines == [
        ["dataset", "image", "dice", "sensitivity", "specificity", "accuracy", "f1", "auc", "cl_recall",
         "cl_precision", "cldice"],
        ["drive", "01_test.tif", "0.750000", "0.500000", "0.250000", "0.333333", "0.125000", "nan", "0.875000",
         "0.500000", "0.636364"],
        ["drive", "02_test.tif", "0.666667", "0.500000", "0.250000", "0.333333", "0.125000", "nan", "0.875000",
         "0.500000", "0.636364"],
        ["drive", "pooled", "0.700000", "0.500000", "0.250000", "0.333333", "0.125000", "nan", "0.875000",
         "0.500000", "0.636364"],
    ]
    assert TEST_METRICS_COLUMNS == tuple(lines[0][2:])
    assert os.listdir(tmp_path) == ["test_metrics.csv"]  # written through a temporary file, none left behind


def test_write_test_metrics_csv_of_several_datasets_has_a_pooled_row_each(tmp_path):
    def result(dice, names):
        vessel = {k: dice / 2 for k in TEST_METRICS_COLUMNS[1:]}
        return ValidationResult(confmat=None, dice=dice, vessel=vessel,
                                rows=[(n, {"dice": dice, **vessel}) for n in names])

    both = DatasetResults([("drive", result(0.8, ["01_test.tif"])), ("stare", result(0.6, ["im0001.ppm", "x.ppm"]))])
    assert both.dice == pytest.approx(0.7)  # every dataset counts the same, whatever its image count
    with open(write_test_metrics(str(tmp_path), both), newline="") as f:
        lines = [row[:3] for row in csv.reader(f)]
    assert lines == [["dataset", "image", "dice"], ["drive", "01_test.tif", "0.800000"], ["drive", "pooled", "0.800000"],
                     ["stare", "im0001.ppm", "0.600000"], ["stare", "x.ppm", "0.600000"],
                     ["stare", "pooled", "0.600000"]]


# ---------------------------------------------------------------------------
# DDP: every image scored on exactly one process, the rows gathered in dataset order


def _validate_on_rank(rank, world_size, init_file, root, state_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = UNet(in_channels=3, num_classes=2, base_c=4)
        model.load_state_dict(torch.load(state_file, weights_only=True))
        dataset = VesselDataset(drive_files(root, "test"), get_transform(False))
        results = {}
        for batch_size in (1, 2):
            loader = loader_of(dataset, batch_size, sampler=ShardedEvalSampler(dataset))
            r = validate(model, loader, CPU, 2, per_image=True)
            results[batch_size] = {"mat": r.confmat.mat, "dice": r.dice, "vessel": r.vessel, "rows": r.rows}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def test_distributed_validation_equals_one_process(drive_root, dataset, images, tmp_path):
    model = tiny_model(images)
    state_file, out = tmp_path / "model.pth", tmp_path / "result.pth"
    torch.save(model.state_dict(), state_file)
    mp.spawn(_validate_on_rank, args=(2, str(tmp_path / "rendezvous"), drive_root, str(state_file), str(out)),
             nprocs=2)
    for batch_size, ddp in torch.load(out, weights_only=False).items():
        one = validate(model, loader_of(dataset, batch_size), CPU, 2, per_image=True)
        assert torch.equal(ddp["mat"], one.confmat.mat)
        assert ddp["dice"] == pytest.approx(one.dice, abs=1e-6)
        assert ddp["vessel"] == pytest.approx(one.vessel, abs=1e-6)
        assert [name for name, _ in ddp["rows"]] == image_names(dataset)  # 3 images on 2 ranks, back in order
        for (_, a), (_, b) in zip(ddp["rows"], one.rows):
            assert a == pytest.approx(b, abs=1e-5)


def test_same_size_batches_keep_the_order_and_never_mix_sizes():
    from my_dataset import SameSizeBatchSampler

    sizes = ["a", "b", "a", "a", "b", "a", "c", "a"]
    batches = list(SameSizeBatchSampler(range(8), sizes, 2))
    assert batches == [[0, 2], [1, 4], [3, 5], [6], [7]]  # each batch when it is full, then the rest
    assert len(SameSizeBatchSampler(range(8), sizes, 2)) == len(batches)
    assert list(SameSizeBatchSampler(range(8), sizes, 1)) == [[i] for i in range(8)]  # the tutorial's batches of 1


def test_train_py_validates_the_same_in_batches(tmp_path):
    from tests.conftest import run_script
    from train_utils.synthetic import write_synthetic_drive

    root = tmp_path / "data"
    write_synthetic_drive(str(root), num_train=4, num_test=5, height=96, width=92, seed=0)
    dice = {}
    for b in (1, 3):
        r = run_script("train.py", "--data-path", root, "--epochs", "1", "--base-c", "8", "--crop-size", "64",
                       "--base-size", "92", "--device", "cpu", "--workers", "0", "--seed", "0", "--no-plots",
                       "--val-batch-size", b, "--output-dir", tmp_path / f"b{b}")
        assert r.returncode == 0, r.stderr
        dice[b] = [line for line in r.stdout.splitlines() if line.startswith("dice coefficient")]
    assert dice[1] and dice[1] == dice[3]
