"""The batched thinning, the centreline scores and the skeleton recall loss against plain loops written
from Zhang and Suen's conditions and the scores' definitions, on drawn shapes."""
import numpy as np
import pytest
import torch

from train_utils.skeleton import centreline_counts, cldice, skeleton_recall_loss, skeletonize


def loop_skeleton(mask):
    """Zhang and Suen's thinning, pixel by pixel: P2..P9 are the neighbours from north, clockwise."""
    x = np.array(mask, dtype=np.uint8)
    h, w = x.shape

    def at(i, j):
        return int(x[i, j]) if 0 <= i < h and 0 <= j < w else 0

    changed = True
    while changed:
        changed = False
        for first in (True, False):
            remove = []
            for i in range(h):
                for j in range(w):
                    if not x[i, j]:
                        continue
                    p2, p3, p4, p5 = at(i - 1, j), at(i - 1, j + 1), at(i, j + 1), at(i + 1, j + 1)
                    p6, p7, p8, p9 = at(i + 1, j), at(i + 1, j - 1), at(i, j - 1), at(i - 1, j - 1)
                    seq = [p2, p3, p4, p5, p6, p7, p8, p9, p2]
                    b = sum(seq[:8])
                    a = sum(1 for k in range(8) if seq[k] == 0 and seq[k + 1] == 1)
                    if first:
                        ok = p2 * p4 * p6 == 0 and p4 * p6 * p8 == 0
                    else:
                        ok = p2 * p4 * p8 == 0 and p2 * p6 * p8 == 0
                    if 2 <= b <= 6 and a == 1 and ok:
                        remove.append((i, j))
            for i, j in remove:
                x[i, j] = 0
            changed = changed or bool(remove)
    return x.astype(bool)


def disc(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def bar(h, w, angle_deg, width, offset=0.0):
    """A straight vessel of ``width`` pixels through the centre at ``angle_deg``."""
    yy, xx = np.mgrid[:h, :w].astype(float)
    t = np.deg2rad(angle_deg)
    dist = np.abs(-(xx - w / 2) * np.sin(t) + (yy - h / 2) * np.cos(t) - offset)
    return dist <= width / 2


def tree(h=40, w=48):
    """A wide trunk with one thin branch: what a vessel map holds."""
    m = bar(h, w, 0, 6)
    m[4:h // 2, 30:31] = True  # a 1 px branch leaving the trunk upwards
    return m


def shapes():
    rng = np.random.default_rng(0)
    blobs = rng.random((30, 37)) < 0.55
    return {
        "empty": np.zeros((9, 11), bool),
        "one pixel": np.pad(np.ones((1, 1), bool), 3),
        "full": np.ones((6, 8), bool),  # touches every border
        "disc": disc(31, 29, 15, 14, 9),
        "bar 2 px, 30 deg": bar(32, 40, 30, 2),
        "bar 5 px, 0 deg": bar(24, 40, 0, 5),
        "bar 7 px, 63 deg": bar(40, 36, 63, 7),
        "bar 4 px, 135 deg": bar(33, 33, 135, 4),
        "ring": disc(35, 35, 17, 17, 14) & ~disc(35, 35, 17, 17, 9),
        "tree": tree(),
        "random": blobs,
    }


@pytest.mark.parametrize("name", list(shapes()))
def test_skeletonize_matches_the_pixel_loop(name):
    mask = shapes()[name]
    assert np.array_equal(skeletonize(torch.from_numpy(mask)).numpy(), loop_skeleton(mask)), name


def test_batched_images_are_thinned_apart_and_check_every_changes_nothing():
    names = ["disc", "bar 2 px, 30 deg", "tree"]
    h, w = 40, 48
    batch = np.zeros((len(names), h, w), bool)
    for k, name in enumerate(names):
        m = shapes()[name]
        batch[k, :m.shape[0], :m.shape[1]] = m
    want = np.stack([loop_skeleton(m) for m in batch])
    for check_every in (1, 3, 8):
        got = skeletonize(torch.from_numpy(batch).unsqueeze(1), check_every=check_every).squeeze(1)
        assert np.array_equal(got.numpy(), want), check_every


def test_a_bar_thins_to_a_one_pixel_line_along_it():
    line = skeletonize(torch.from_numpy(bar(24, 60, 0, 5))).numpy()
    rows = line[:, 6:-6].sum(0)  # away from the ends
    assert (rows == 1).all()
    assert set(np.nonzero(line[:, 6:-6])[0]) == {12}


def loop_counts(pred, label, valid):
    """The four centreline counts, pixel by pixel."""
    pred, label = pred & valid, label & valid
    label_line, pred_line = loop_skeleton(label), loop_skeleton(pred)
    counts = [0, 0, 0, 0]
    for i in range(pred.shape[0]):
        for j in range(pred.shape[1]):
            counts[0] += label_line[i, j]
            counts[1] += label_line[i, j] and pred[i, j]
            counts[2] += pred_line[i, j]
            counts[3] += pred_line[i, j] and label[i, j]
    return counts


def test_centreline_counts_and_cldice_against_loops():
    label = tree()
    trunk_only = bar(40, 48, 0, 6)
    wide = bar(40, 48, 0, 12)
    valid = np.ones_like(label)
    valid[:, :3] = False  # outside the FOV
    preds = [trunk_only, wide, label, np.zeros_like(label)]
    got = centreline_counts(torch.from_numpy(np.stack(preds) & valid), torch.from_numpy(np.stack([label] * 4) & valid))
    want = [loop_counts(p, label, valid) for p in preds]
    assert got.tolist() == want
    # The trunk alone misses the branch's centreline: recall below 1 by the branch's share, precision 1.
    scores = cldice(got[0])
    label_line, found, pred_line, right = want[0]
    assert scores["cl_recall"] == found / label_line < 0.8
    assert scores["cl_precision"] == right / pred_line == 1.0
    r, p = found / label_line, 1.0
    assert scores["cldice"] == pytest.approx(2 * r * p / (r + p), rel=1e-15)
    # A prediction twice as wide costs pixel precision, not centreline precision: its own centreline lies
    # inside the label. The label itself scores 1 everywhere, nothing 0.
    assert cldice(got[1])["cl_precision"] == 1.0 and cldice(got[1])["cl_recall"] >= scores["cl_recall"]
    assert cldice(got[2]) == {"cl_recall": 1.0, "cl_precision": 1.0, "cldice": 1.0}
    assert cldice(got[3]) == {"cl_recall": 0.0, "cl_precision": 0.0, "cldice": 0.0}
    # Pooled over images: counts add up, so the shares are of all centreline pixels.
    pooled = cldice(got.sum(0))
    assert pooled["cl_recall"] == sum(c[1] for c in want) / sum(c[0] for c in want)


def loop_skeleton_recall_loss(logits, target, ignore=255):
    """1 - covered / total over the one-pixel-thickened label centreline inside the label, mean over images
    that have one."""
    losses = []
    for n in range(target.shape[0]):
        t = target[n].numpy()
        vessel = (t != 0) & (t != ignore)
        line = loop_skeleton(vessel)
        h, w = t.shape
        p = 1 - torch.softmax(logits[n].double(), 0)[0].numpy()
        total = covered = 0.0
        for i in range(h):
            for j in range(w):
                near = any(line[a, b] for a in range(max(i - 1, 0), min(i + 2, h))
                           for b in range(max(j - 1, 0), min(j + 2, w)))
                if near and vessel[i, j]:
                    total += 1
                    covered += p[i, j]
        if total:
            losses.append(1 - covered / total)
    return sum(losses) / len(losses) if losses else 0.0


def test_skeleton_recall_loss_against_a_loop_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    target = torch.from_numpy(np.stack([tree(), bar(40, 48, 40, 3), np.zeros((40, 48), bool)])).long()
    target[0][target[0] == 1] = 2  # a second vessel class counts as vessel
    target[1, :, :5] = 255  # ignored pixels are not vessel
    logits = torch.randn(3, 3, 40, 48, generator=g, requires_grad=True)
    loss = skeleton_recall_loss(logits, target)
    assert loss.item() == pytest.approx(loop_skeleton_recall_loss(logits.detach(), target), rel=1e-5)
    loss.backward()
    assert logits.grad[2].abs().sum() == 0  # the image without vessels adds nothing
    assert logits.grad[0].abs().sum() > 0
    # bfloat16 logits give the float32 loss of the same values; no vessel anywhere is a loss of 0.
    assert skeleton_recall_loss(logits.detach().bfloat16(), target).dtype == torch.float32
    assert skeleton_recall_loss(logits.detach(), torch.zeros_like(target)).item() == 0.0
