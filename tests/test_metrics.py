"""Validation metrics and the LR schedule against plain loops written from the tutorial's formulas."""
import numpy as np
import pytest
import torch

from tests.conftest import sync_debug_error
from tests.test_losses import loop_dice, random_target
from train_utils.distributed_utils import ConfusionMatrix, DiceCoefficient, ShardedEvalSampler
from train_utils.train_and_eval import create_lr_scheduler


def loop_confusion(targets, preds, n):
    mat = np.zeros((n, n), dtype=np.int64)
    for t, p in zip(targets, preds):
        for a, b in zip(t.reshape(-1).tolist(), p.reshape(-1).tolist()):
            if 0 <= a < n:
                mat[a, b] += 1
    return mat


@pytest.mark.parametrize("n", [2, 3])
def test_confusion_matrix_matches_loop(n):
    gen = torch.Generator().manual_seed(n)
    cm = ConfusionMatrix(n)
    targets, preds = [], []
    for h, w in [(5, 7), (9, 4), (1, 1)]:
        t = random_target(1, n, h, w, gen)
        p = torch.randint(0, n, (1, h, w), generator=gen)
        cm.update(t.flatten(), p.flatten())
        targets.append(t)
        preds.append(p)
    ref = loop_confusion(targets, preds, n)
    assert np.array_equal(cm.mat.numpy(), ref)
    acc_global, acc, iu = cm.compute()
    diag = np.diag(ref)
    assert acc_global.item() == pytest.approx(diag.sum() / ref.sum())
    np.testing.assert_allclose(acc.numpy(), diag / ref.sum(1))
    np.testing.assert_allclose(iu.numpy(), diag / (ref.sum(1) + ref.sum(0) - diag))
    text = str(cm)
    for key in ("global correct", "average row correct", "IoU", "mean IoU"):
        assert key in text
    cm.reset()
    assert cm.mat.sum() == 0


def loop_validation_dice(batches, num_classes):
    """Per image: argmax one-hot, background dropped, mean over classes of the loop dice; mean over images."""
    scores = []
    for logits, target in batches:
        for i in range(logits.shape[0]):
            pred = logits[i:i + 1].argmax(1)
            per_class = []
            for c in range(1, num_classes):
                x = (pred == c).double()
                t = torch.where(target[i:i + 1] == 255, 255, (target[i:i + 1] == c).long())
                per_class.append(loop_dice(x, t, 255))
            scores.append(sum(per_class) / len(per_class))
    return sum(scores) / len(scores)


@pytest.mark.parametrize("n", [2, 3])
def test_dice_coefficient_matches_loop_and_ignores_batching(n):
    gen = torch.Generator().manual_seed(10 + n)
    batches = [(torch.randn(b, n, 6, 7, generator=gen), random_target(b, n, 6, 7, gen)) for b in (1, 3, 2)]
    batches[1][1][0] = 255  # an all-ignored image
    dice = DiceCoefficient(num_classes=n, ignore_index=255)
    for logits, target in batches:
        dice.update(logits, target)
    expected = loop_validation_dice(batches, n)
    assert dice.value.item() == pytest.approx(expected, abs=1e-6)
    # The same images one at a time give the same value: it is a mean over images.
    single = DiceCoefficient(num_classes=n, ignore_index=255)
    for logits, target in batches:
        for i in range(logits.shape[0]):
            single.update(logits[i:i + 1], target[i:i + 1])
    assert single.value.item() == pytest.approx(expected, abs=1e-6)
    dice.reset()  # the tutorial's reset crashed (zeros_ does not exist)
    assert dice.value.item() == 0
    assert DiceCoefficient().value.item() == 0  # nothing seen yet


def test_sharded_eval_sampler_covers_each_index_once():
    data = list(range(5))
    shards = [list(ShardedEvalSampler(data, num_replicas=2, rank=r)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == data
    assert [len(ShardedEvalSampler(data, 2, r)) for r in range(2)] == [3, 2]


def loop_lr_factor(x, num_step, epochs, warmup_epochs=1, warmup_factor=1e-3):
    if x <= warmup_epochs * num_step:
        alpha = x / (warmup_epochs * num_step)
        return warmup_factor * (1 - alpha) + alpha
    return (1 - (x - warmup_epochs * num_step) / ((epochs - warmup_epochs) * num_step)) ** 0.9


def test_lr_schedule_values():
    num_step, epochs, base = 5, 4, 0.01
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    sched = create_lr_scheduler(opt, num_step, epochs)
    seen = [opt.param_groups[0]["lr"]]
    for _ in range(num_step * epochs):
        opt.step()
        sched.step()
        seen.append(opt.param_groups[0]["lr"])
    expected = [base * loop_lr_factor(x, num_step, epochs) for x in range(num_step * epochs + 1)]
    np.testing.assert_allclose(seen, expected, rtol=1e-12, atol=1e-15)
    assert seen[0] == pytest.approx(base * 1e-3)
    assert seen[num_step] == pytest.approx(base)
    assert seen[-1] == pytest.approx(0.0, abs=1e-15)


def test_lr_schedule_without_warmup_and_single_epoch():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = create_lr_scheduler(opt, 4, 2, warmup=False)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 ** 0.9)
    # One epoch, all warm-up: the tutorial divided by zero here.
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = create_lr_scheduler(opt, 3, 1)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)


@pytest.mark.cuda
def test_validation_metrics_update_without_waiting_for_the_gpu():
    """ConfusionMatrix and DiceCoefficient stay on the device during validation: no update waits for the GPU,
    and the totals equal the CPU's."""
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(b, 2, 6, 7, generator=gen), random_target(b, 2, 6, 7, gen)) for b in (1, 3)]
    on_device = [(logits.cuda(), target.cuda()) for logits, target in batches]  # copies, before the check
    cm, dice = ConfusionMatrix(2), DiceCoefficient(num_classes=2, ignore_index=255)
    torch.cuda.synchronize()
    with sync_debug_error():
        for logits, target in on_device:
            cm.update(target.flatten(), logits.argmax(1).flatten())
            dice.update(logits, target)
    assert cm.mat.is_cuda and dice.value.is_cuda
    assert np.array_equal(cm.mat.cpu().numpy(), loop_confusion([t for _, t in batches],
                                                               [x.argmax(1) for x, _ in batches], 2))
    assert dice.value.item() == pytest.approx(loop_validation_dice(batches, 2), abs=1e-6)


@pytest.mark.cuda
def test_the_sync_check_catches_a_wait():
    """The check the CUDA tests rely on can fail: reading a device value on the host raises inside it."""
    x = torch.ones(3, device="cuda")
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match="synchroniz"):
        with sync_debug_error():
            x.sum().item()
