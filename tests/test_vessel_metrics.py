"""VesselMetrics against plain loops written from the formulas, and its two-process gloo reduction."""
import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import sync_debug_error
from tests.test_skeleton import loop_counts
from train_utils.metrics import VesselMetrics
from train_utils.skeleton import cldice

IGNORE = 255
# (batch, height, width, logits dtype) per update(): different sizes, a batch of 1, several dtypes.
SHAPES = [(2, 9, 31, torch.float32), (1, 17, 23, torch.float64), (3, 12, 20, torch.bfloat16)]


def make_batches(num_classes, tied, seed=0):
    """Random logits/targets with ~30% ignored pixels and one all-ignored image.

    ``tied`` draws logits from {-1, 0, 1}: few distinct probabilities, so many
    vessel/background pairs tie exactly, and argmax ties too.
    """
    g = torch.Generator().manual_seed(seed)
    batches = []
    for n, h, w, dtype in SHAPES:
        if tied:
            logits = torch.randint(-1, 2, (n, num_classes, h, w), generator=g).to(dtype)
        else:
            logits = (3 * torch.randn(n, num_classes, h, w, generator=g)).to(dtype)
        target = torch.randint(0, num_classes, (n, h, w), generator=g)
        target[torch.rand(n, h, w, generator=g) < 0.3] = IGNORE
        batches.append((logits, target))
    batches[1][1][0] = IGNORE  # the batch of 1 is entirely outside the FOV
    return batches


def reference(batches, ignore_index=IGNORE):
    """Loop over every pixel, counting TP/FP/TN/FN and collecting scores by class."""
    tp = fp = tn = fn = 0
    pos, neg = [], []
    centreline = [0, 0, 0, 0]
    for logits, target in batches:
        x = logits.float().numpy()
        prob = (1 - torch.softmax(logits.float(), 1)[:, 0]).numpy()  # the score's definition
        t = target.numpy()
        for n in range(t.shape[0]):
            for i in range(t.shape[1]):
                for j in range(t.shape[2]):
                    if t[n, i, j] == ignore_index:
                        continue
                    pred = int(np.argmax(x[n, :, i, j])) != 0
                    gt = t[n, i, j] != 0
                    tp += pred and gt
                    fp += pred and not gt
                    tn += not pred and not gt
                    fn += not pred and gt
                    (pos if gt else neg).append(prob[n, i, j])
            valid = t[n] != ignore_index
            counts = loop_counts(np.argmax(x[n], axis=0) != 0, t[n] != 0, valid)
            centreline = [a + b for a, b in zip(centreline, counts)]
    ratio = lambda a, b: a / b if b else 0.0  # noqa: E731
    return {
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "accuracy": ratio(tp + tn, tp + tn + fp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "auc": brute_force_auc(pos, neg),
        **cldice(centreline),
    }


def brute_force_auc(pos, neg):
    """Count every (vessel, background) pair: 1 if the vessel pixel scores higher, 1/2 if tied."""
    if not pos or not neg:
        return float("nan")
    neg = np.array(neg)
    wins = 0.0
    for p in pos:
        wins += np.sum(p > neg) + 0.5 * np.sum(p == neg)
    return wins / (len(pos) * len(neg))


def assert_same(got, want):
    assert list(got) == list(VesselMetrics.NAMES)
    for name in VesselMetrics.NAMES:
        assert isinstance(got[name], float), name
        if math.isnan(want[name]):
            assert math.isnan(got[name]), name
        else:
            assert got[name] == pytest.approx(want[name], rel=1e-12, abs=1e-12), name


def run_metrics(batches, **kwargs):
    m = VesselMetrics(**kwargs)
    for logits, target in batches:
        m.update(logits, target)
    return m


@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("tied", [False, True])
def test_matches_pixel_loops(num_classes, tied):
    batches = make_batches(num_classes, tied)
    if tied:  # make sure the tie handling is really exercised
        probs = torch.cat([(1 - torch.softmax(x.float(), 1)[:, 0]).flatten() for x, _ in batches])
        assert len(torch.unique(probs)) < 30
    assert_same(run_metrics(batches).compute(), reference(batches))


def test_auc_exact_in_simple_cases():
    target = torch.tensor([[[0, 1, 0, 1, IGNORE]]])
    # All probabilities equal: every pair ties.
    assert run_metrics([(torch.zeros(1, 2, 1, 5), target)]).compute()["auc"] == 0.5
    # Perfect separation, and its reverse; the ignored pixel has the worst score and must not count.
    good = torch.tensor([[[[0.0, 0, 0, 0, 0]], [[-5.0, 5, -5, 5, -9]]]])
    assert run_metrics([(good, target)]).compute()["auc"] == 1.0
    assert run_metrics([(-good, target)]).compute()["auc"] == 0.0
    # Two foreground classes: the score is 1 - p(background), not p(class 1).
    logits = torch.tensor([[[[0.0, 0.0]], [[1.0, -5.0]], [[-5.0, 2.0]]]])
    assert run_metrics([(logits, torch.tensor([[[0, 2]]]))]).compute()["auc"] == 1.0


def test_pooled_not_averaged_per_image():
    # Each image alone has AUC 1, but image 2's vessel scores below image 1's background:
    # of the 4 pooled pairs, 3 are ordered right.
    a = (torch.tensor([[[[0.0, 0]], [[1.0, 2]]]]), torch.tensor([[[0, 1]]]))
    b = (torch.tensor([[[[0.0, 0]], [[-2.0, -1]]]]), torch.tensor([[[0, 1]]]))
    assert run_metrics([a, b]).compute()["auc"] == 0.75


def test_empty_and_single_class():
    nothing = {"sensitivity": 0.0, "specificity": 0.0, "accuracy": 0.0, "f1": 0.0, "auc": float("nan"),
               "cl_recall": 0.0, "cl_precision": 0.0, "cldice": 0.0}
    assert_same(VesselMetrics().compute(), nothing)
    all_ignored = run_metrics([(torch.randn(2, 2, 4, 5), torch.full((2, 4, 5), -100))], ignore_index=-100)
    assert_same(all_ignored.compute(), nothing)
    # Only vessel pixels, all predicted vessel: sensitivity 1, specificity has no denominator, AUC undefined.
    only_vessel = run_metrics([(torch.tensor([[[[0.0]], [[1.0]]]]), torch.tensor([[[1]]]))]).compute()
    assert_same(only_vessel, {"sensitivity": 1.0, "specificity": 0.0, "accuracy": 1.0, "f1": 1.0,
                              "auc": float("nan"), "cl_recall": 1.0, "cl_precision": 1.0, "cldice": 1.0})


def test_state_stays_on_device_as_int64():
    m = run_metrics(make_batches(2, tied=False))
    assert m.counts.dtype == torch.int64 and m.counts.shape == (VesselMetrics.COUNTS,)
    assert all(s.dtype == torch.float32 for s in m.scores)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="expected logits"):
        VesselMetrics().update(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.int64))


def test_str_and_reset():
    m = run_metrics(make_batches(2, tied=False))
    lines = str(m).splitlines()
    values = m.compute()
    assert lines == [f"{k}: {values[k]:.4f}" for k in VesselMetrics.NAMES]
    assert lines[0].startswith("sensitivity: 0.") and len(lines[0].split(": ")[1]) == 6
    m.reset()
    assert m.counts is None and not m.scores
    assert "auc: nan" in str(m).splitlines()


@pytest.mark.cuda
def test_update_does_not_sync_on_cuda():
    logits, target = make_batches(3, tied=False)[0]
    # On the device before the check: the copy from the host is what would synchronise, not update.
    device_logits, device_target = logits.cuda(), target.cuda()
    m = VesselMetrics()
    torch.cuda.synchronize()
    with sync_debug_error():
        for _ in range(2):
            m.update(device_logits, device_target)
    assert m.counts.is_cuda
    assert_same(m.compute(), run_metrics([(logits, target)] * 2).compute())


def _distributed_worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        batches = make_batches(3, tied=True)
        results = []
        # Rank 0 holds two batches (3 images), rank 1 one batch (3 other images, other size);
        # then rank 0 holds everything and rank 1 nothing.
        for mine in ([batches[:2], batches[2:]], [batches, []]):
            m = run_metrics(mine[rank])
            m.reduce_from_all_processes()
            results.append(m.compute())
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def test_reduce_from_all_processes_gloo(tmp_path):
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    batches = make_batches(3, tied=True)
    single = run_metrics(batches).compute()
    assert_same(single, reference(batches))
    for rank in range(2):
        for got in json.loads((tmp_path / f"rank{rank}.json").read_text()):
            assert_same(got, single)


def test_reduce_is_noop_without_distributed():
    m = run_metrics(make_batches(2, tied=False))
    before = m.compute()
    m.reduce_from_all_processes()
    assert_same(m.compute(), before)
