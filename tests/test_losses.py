"""Loss and dice against plain loops written from the tutorial's formulas (docs/metrics.md)."""
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import sync_debug_error
from train_utils.dice_coefficient_loss import build_target, dice_coeff, dice_loss, multiclass_dice_coeff
from train_utils.skeleton import skeleton_recall_loss
from train_utils.train_and_eval import criterion

EPS = 1e-6


def loop_dice(x, t, ignore_index):
    """The tutorial's per-image loop: mean over images of (2I + eps) / (S + eps), S == 0 -> 2I."""
    d = 0.0
    for i in range(x.shape[0]):
        xi, ti = x[i].reshape(-1).double(), t[i].reshape(-1).double()
        if ignore_index >= 0:
            keep = ti != ignore_index
            xi, ti = xi[keep], ti[keep]
        inter = float((xi * ti).sum())
        sets = float(xi.sum() + ti.sum())
        if sets == 0:
            sets = 2 * inter
        d += (2 * inter + EPS) / (sets + EPS)
    return d / x.shape[0]


def loop_multiclass(x, t, ignore_index):
    return sum(loop_dice(x[:, c], t[:, c], ignore_index) for c in range(x.shape[1])) / x.shape[1]


def loop_build_target(target, num_classes, ignore_index):
    n, h, w = target.shape
    out = torch.zeros(n, num_classes, h, w)  # float, as the tutorial's one_hot(...).float()
    for i in range(n):
        for y in range(h):
            for x in range(w):
                v = int(target[i, y, x])
                if v == ignore_index:
                    out[i, :, y, x] = ignore_index
                else:
                    out[i, v, y, x] = 1
    return out


def random_target(n, c, h, w, gen, ignore_frac=0.3):
    t = torch.randint(0, c, (n, h, w), generator=gen)
    return torch.where(torch.rand(n, h, w, generator=gen) < ignore_frac, 255, t)


@pytest.mark.parametrize("n,c", [(1, 2), (4, 2), (3, 3)])
def test_build_target_matches_loop(n, c):
    gen = torch.Generator().manual_seed(n * 10 + c)
    t = random_target(n, c, 7, 5, gen)
    built = build_target(t, c, 255)
    assert built.dtype == torch.float32 and torch.equal(built, loop_build_target(t, c, 255))
    t_plain = torch.randint(0, c, (n, 7, 5), generator=gen)
    built = build_target(t_plain, c)
    assert built.dtype == torch.float32 and torch.equal(built, F.one_hot(t_plain, c).float().permute(0, 3, 1, 2))


@pytest.mark.parametrize("n,c,h,w", [(1, 2, 9, 7), (4, 2, 16, 16), (3, 3, 11, 13), (2, 4, 5, 6)])
def test_dice_matches_loop_on_random_inputs(n, c, h, w):
    gen = torch.Generator().manual_seed(n + c + h)
    x = torch.randn(n, c, h, w, generator=gen).softmax(1)
    t = build_target(random_target(n, c, h, w, gen), c, 255)
    assert multiclass_dice_coeff(x, t, 255).item() == pytest.approx(loop_multiclass(x, t, 255), abs=1e-5)
    assert dice_coeff(x, t, 255).item() == pytest.approx(loop_dice(x, t, 255), abs=1e-5)
    assert dice_coeff(x, t.clamp(max=1)).item() == pytest.approx(loop_dice(x, t.clamp(max=1), -100), abs=1e-5)


def test_absent_class_and_all_ignored_image():
    # Class 2 never appears in the target and the prediction gives it exactly 0: S == 0, so d = eps/eps = 1.
    x = torch.zeros(3, 3, 6, 6)
    x[:, 0] = 0.7
    x[:, 1] = 0.3
    t = torch.zeros(3, 6, 6, dtype=torch.int64)
    t[:, 2:4] = 1
    t[1] = 255  # an image whose every pixel is ignored
    dt = build_target(t, 3, 255)
    ours = multiclass_dice_coeff(x, dt, 255).item()
    assert ours == pytest.approx(loop_multiclass(x, dt, 255), abs=1e-6)
    # The all-ignored image scores 1 for every class (empty sets), as the loop formula says.
    per_image_class2 = loop_dice(x[1:2, 2], dt[1:2, 2], 255)
    assert per_image_class2 == pytest.approx(1.0)


def test_dice_loss_is_float32_for_any_logit_dtype():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 8, 8, generator=gen)
    t = build_target(random_target(2, 2, 8, 8, gen), 2, 255)
    ref = dice_loss(logits, t, multiclass=True, ignore_index=255)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        out = dice_loss(logits.to(dtype), t, multiclass=True, ignore_index=255)
        assert out.dtype == torch.float32
        assert out.item() == pytest.approx(ref.item(), abs=2e-2)
    expected = 1 - loop_multiclass(logits.softmax(1), t, 255)
    assert ref.item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.cuda
def test_dice_loss_does_not_wait_for_the_gpu():
    """The tutorial's dice loss asked the host ``if sets_sum == 0`` for every image and class; this one never
    waits for the GPU, and gives the CPU's value."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 2, 16, 16, generator=gen)
    target = random_target(4, 2, 16, 16, gen)
    target[1] = 255  # an image with nothing to score: the empty-set case
    device_logits, device_target = logits.cuda(), target.cuda()  # copies, before the check
    torch.cuda.synchronize()
    with sync_debug_error():
        loss = dice_loss(device_logits, build_target(device_target, 2, 255), multiclass=True, ignore_index=255)
    expected = 1 - loop_multiclass(logits.softmax(1), build_target(target, 2, 255), 255)
    assert loss.is_cuda and loss.item() == pytest.approx(expected, abs=1e-5)


def loop_criterion(x, target, weight, num_classes):
    ce = F.cross_entropy(x.double(), target, ignore_index=255,
                         weight=None if weight is None else weight.double())
    dt = build_target(target, num_classes, 255)
    return float(ce) + 1 - loop_multiclass(x.double().softmax(1), dt, 255)


@pytest.mark.parametrize("c", [2, 3])
def test_criterion_with_and_without_aux(c):
    gen = torch.Generator().manual_seed(c)
    out = torch.randn(2, c, 10, 12, generator=gen)
    aux = torch.randn(2, c, 10, 12, generator=gen)
    t = random_target(2, c, 10, 12, gen)
    w = torch.tensor([1.0, 2.0]) if c == 2 else None
    expected = loop_criterion(out, t, w, c)
    assert criterion({"out": out}, t, w, num_classes=c, ignore_index=255).item() == pytest.approx(expected, abs=1e-5)
    with_aux = criterion({"out": out, "aux": aux}, t, w, num_classes=c, ignore_index=255).item()
    assert with_aux == pytest.approx(expected + 0.5 * loop_criterion(aux, t, w, c), abs=1e-5)
    assert criterion({"out": out.bfloat16()}, t, w, num_classes=c, ignore_index=255).dtype == torch.float32


@pytest.mark.parametrize("c", [2, 3])
def test_criterion_adds_the_weighted_skeleton_recall_loss(c):
    gen = torch.Generator().manual_seed(c)
    out = torch.randn(2, c, 16, 20, generator=gen)
    t = random_target(2, c, 16, 20, gen)
    w = torch.tensor([1.0, 2.0]) if c == 2 else None
    plain = criterion({"out": out}, t, w, num_classes=c, ignore_index=255)
    assert criterion({"out": out}, t, w, num_classes=c, ignore_index=255, skeleton_recall=0.0).item() == plain.item()
    extra = skeleton_recall_loss(out, t, 255)
    assert extra.item() > 0
    got = criterion({"out": out}, t, w, num_classes=c, ignore_index=255, skeleton_recall=1.5)
    assert got.item() == pytest.approx(plain.item() + 1.5 * extra.item(), abs=1e-6)


def test_criterion_gradient_flows():
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    t = torch.randint(0, 2, (1, 8, 8))
    criterion({"out": x}, t, num_classes=2, ignore_index=255).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
