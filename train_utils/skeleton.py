"""Centrelines of binary masks as batched tensor operations on any device: Zhang and Suen's thinning
(``skeletonize``), the centreline scores that pixel dice misses (``centreline_counts``, ``cldice``) and the
skeleton recall loss.

Zhang, T. Y. and Suen, C. Y. (1984), "A fast parallel algorithm for thinning digital patterns",
Communications of the ACM 27(3). A pixel P1 with neighbours P2..P9 (north, then clockwise) is removed when

    2 <= B(P1) <= 6      B: how many neighbours are set
    A(P1) == 1           A: how many 0 -> 1 steps in the cycle P2, P3, ..., P9, P2
    first sub-iteration:  P2 * P4 * P6 == 0 and P4 * P6 * P8 == 0
    second sub-iteration: P2 * P4 * P8 == 0 and P2 * P6 * P8 == 0

each sub-iteration deciding every pixel from the same image, alternately until nothing changes. The
conditions are tabulated once for the 256 neighbourhoods, so one sub-iteration is eight shifted ORs and a
table lookup over the whole batch.
"""
import torch
import torch.nn.functional as F

# (row, column) offsets of P2..P9: north, north-east, east, south-east, south, south-west, west, north-west.
NEIGHBOURS = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))


def removable(code, first):
    """Whether Zhang and Suen's sub-iteration (``first`` or second) removes a set pixel whose neighbours
    P2..P9 are the bits 0..7 of ``code``."""
    p2, p3, p4, p5, p6, p7, p8, p9 = ((code >> k) & 1 for k in range(8))
    ring = (p2, p3, p4, p5, p6, p7, p8, p9, p2)
    set_neighbours = p2 + p3 + p4 + p5 + p6 + p7 + p8 + p9
    transitions = sum(1 for a, b in zip(ring, ring[1:]) if a == 0 and b == 1)
    if first:
        side = p2 * p4 * p6 == 0 and p4 * p6 * p8 == 0
    else:
        side = p2 * p4 * p8 == 0 and p2 * p6 * p8 == 0
    return 2 <= set_neighbours <= 6 and transitions == 1 and side


_TABLES = {}


def _tables(device):
    if device not in _TABLES:
        _TABLES[device] = [torch.tensor([removable(c, first) for c in range(256)], dtype=torch.bool, device=device)
                           for first in (True, False)]
    return _TABLES[device]


def _neighbour_code(x):
    """Each pixel's P2..P9 as the bits of an integer (pixels beyond the border count as unset)."""
    h, w = x.shape[-2:]
    padded = F.pad(x.to(torch.uint8), (1, 1, 1, 1))  # uint8 holds the 8 bits: 6x faster than int32 on a CPU
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for k, (dy, dx) in enumerate(NEIGHBOURS):
        code |= padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] << k
    return code.long()


@torch.no_grad()
def skeletonize(mask, check_every=4):
    """The one-pixel-wide centreline of a boolean mask ``[..., H, W]`` (every leading dim an image of its own),
    as a boolean tensor of the same shape, by Zhang and Suen's thinning.

    Convergence is checked every ``check_every`` rounds (one host sync each); rounds after convergence
    change nothing, so the result does not depend on it.
    """
    x = mask.bool()  # never changed in place: each round makes a new tensor
    if x.numel() == 0:
        return x
    tables = _tables(x.device)
    while True:
        before = x
        for _ in range(check_every):
            for table in tables:
                x = x & ~torch.take(table, _neighbour_code(x))
        if torch.equal(x, before):
            return x


def centreline_counts(pred, label):
    """Per image ``[N, 4]`` int64: the label's centreline pixels, those of them inside ``pred``, the
    prediction's centreline pixels, and those of them inside ``label``.

    ``pred`` and ``label`` are boolean ``[N, H, W]`` vessel masks, each already cleared outside the field
    of view (and padding): what lies there must not shape the centreline.
    """
    label_line, pred_line = skeletonize(label), skeletonize(pred)
    return torch.stack([label_line.sum((-2, -1)), (label_line & pred).sum((-2, -1)),
                        pred_line.sum((-2, -1)), (pred_line & label).sum((-2, -1))], dim=-1)


def cldice(counts):
    """Centreline recall, centreline precision and clDice (Shit et al., CVPR 2021) of ``centreline_counts``
    (summed over any images pooled), as Python floats. Recall is the share of the label's centreline inside
    the prediction, precision the share of the prediction's centreline inside the label; clDice their
    harmonic mean. A share with nothing to share is 0.0."""
    label_line, label_found, pred_line, pred_right = (int(c) for c in counts)
    recall = label_found / label_line if label_line else 0.0
    precision = pred_right / pred_line if pred_line else 0.0
    both = recall + precision
    return {"cl_recall": recall, "cl_precision": precision, "cldice": 2 * recall * precision / both if both else 0.0}


def skeleton_recall_loss(logits, target, ignore_index=255):
    """1 - the share of the label's centreline that the vessel probability covers (Kirchhoff et al., "Skeleton
    Recall Loss for Connectivity Conserving and Resource Efficient Segmentation of Thin Tubular Structures",
    ECCV 2024): every centreline pixel weighs the same, whatever its vessel's width, so a missed thin branch
    costs as much as a missed stretch of a wide vessel.

    ``logits`` [N, C, H, W] (vessel: every class but 0), ``target`` [N, H, W] class indices. The centreline
    is thickened by one pixel across, inside the label, so that a prediction a pixel off the thinned line
    still counts. Computed in float32; an image without vessel pixels adds nothing.
    """
    vessel = (target != 0) & (target != ignore_index)
    line = skeletonize(vessel).unsqueeze(1).float()
    tube = (F.max_pool2d(line, 3, stride=1, padding=1) > 0).squeeze(1) & vessel
    p_vessel = 1 - F.softmax(logits.float(), dim=1)[:, 0]
    tube = tube.float()
    total = tube.sum((-2, -1))
    covered = (p_vessel * tube).sum((-2, -1))
    has_line = total > 0
    missed = torch.where(has_line, 1 - covered / total.clamp(min=1), 0)
    return missed.sum() / has_line.sum().clamp(min=1)
