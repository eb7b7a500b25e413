"""The validation metrics, all reducing across processes with one all-reduce each: the tutorial's
``ConfusionMatrix`` and ``DiceCoefficient``, and the vessel metrics papers report (``VesselMetrics``).

``IGNORE_INDEX`` (255) marks pixels no metric or loss counts: outside the field of
view, and the padding of crops and batches.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .dice_coefficient_loss import build_target, dice_per_item
from .distributed_utils import collective_device, is_dist_avail_and_initialized
from .imaging import IGNORE_INDEX  # noqa: F401 - defined with the label files, re-exported here
from .skeleton import centreline_counts, cldice


class ConfusionMatrix:
    """Pixel confusion matrix (rows: target, columns: prediction); targets outside [0, n) are ignored."""

    def __init__(self, num_classes):
        self.num_classes = num_classes
        self.mat = None

    def update(self, a, b):
        """``a``: target class indices, ``b``: predicted indices, any shape (flattened)."""
        n = self.num_classes
        a = a.reshape(-1).to(torch.int64)
        b = b.reshape(-1).to(torch.int64)
        if self.mat is None:
            self.mat = torch.zeros((n, n), dtype=torch.int64, device=a.device)
        with torch.no_grad():
            # Ignored pixels go to an extra bin that is dropped: boolean indexing and bincount
            # would both wait for the host on CUDA.
            valid = (a >= 0) & (a < n)
            inds = torch.where(valid, n * a + b, n * n)
            counts = torch.zeros(n * n + 1, dtype=torch.int64, device=a.device)
            counts.index_add_(0, inds, torch.ones_like(inds))
            self.mat += counts[: n * n].view(n, n)

    def reset(self):
        if self.mat is not None:
            self.mat.zero_()

    def compute(self):
        h = self.mat.double()
        acc_global = torch.diag(h).sum() / h.sum()
        acc = torch.diag(h) / h.sum(1)
        iu = torch.diag(h) / (h.sum(1) + h.sum(0) - torch.diag(h))
        return acc_global, acc, iu

    def reduce_from_all_processes(self):
        if is_dist_avail_and_initialized():
            if self.mat is None:  # a rank with no validation images still takes part
                self.mat = torch.zeros((self.num_classes, self.num_classes), dtype=torch.int64)
            mat = self.mat.to(collective_device())
            dist.all_reduce(mat)
            self.mat = mat.to(self.mat.device)

    def summary(self):
        """The block's numbers as plain floats (percent), for the JSON log."""
        acc_global, acc, iu = self.compute()
        return {"global_correct": acc_global.item() * 100, "average_row_correct": (acc * 100).tolist(),
                "iou": (iu * 100).tolist(), "mean_iou": iu.nanmean().item() * 100}

    def __str__(self):
        s = self.summary()
        return ("global correct: {:.1f}\n"
                "average row correct: {}\n"
                "IoU: {}\n"
                "mean IoU: {:.1f}").format(s["global_correct"],
                                           ["{:.1f}".format(i) for i in s["average_row_correct"]],
                                           ["{:.1f}".format(i) for i in s["iou"]],
                                           s["mean_iou"])


class DiceCoefficient:
    """Validation dice: argmax, one-hot, background dropped, the dice formula; mean over images.

    The tutorial averages per batch with a validation batch size of 1, i.e. per
    image; summing per-image values makes the result independent of the batch
    size and exact under DDP, where each process holds different images.
    """

    def __init__(self, num_classes: int = 2, ignore_index: int = -100):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.cumulative_dice = None
        self.count = None

    def update(self, pred, target):
        """``pred``: logits [N, C, H, W]; ``target``: class indices [N, H, W]."""
        if self.cumulative_dice is None:
            self.cumulative_dice = torch.zeros(1, dtype=torch.float64, device=pred.device)
            self.count = torch.zeros(1, dtype=torch.float64, device=pred.device)
        with torch.no_grad():
            one_hot = F.one_hot(pred.argmax(dim=1), self.num_classes).permute(0, 3, 1, 2).float()
            dice_target = build_target(target, self.num_classes, self.ignore_index)
            per_image = dice_per_item(one_hot[:, 1:], dice_target[:, 1:], self.ignore_index, 1e-6, keep_dims=2)
            self.cumulative_dice += per_image.mean(dim=1).double().sum()  # float64: any batch size sums alike
            self.count += pred.shape[0]

    @property
    def value(self):
        if self.cumulative_dice is None:
            return torch.zeros(1)
        return torch.where(self.count > 0, self.cumulative_dice / self.count.clamp(min=1), 0)

    def reset(self):
        if self.cumulative_dice is not None:
            self.cumulative_dice.zero_()
        if self.count is not None:
            self.count.zero_()

    def reduce_from_all_processes(self):
        if not is_dist_avail_and_initialized():
            return
        if self.cumulative_dice is None:  # a rank with no validation images still takes part
            self.cumulative_dice = torch.zeros(1, dtype=torch.float64)
            self.count = torch.zeros(1, dtype=torch.float64)
        t = torch.cat([self.cumulative_dice, self.count]).to(collective_device())
        dist.all_reduce(t)
        self.cumulative_dice, self.count = t[:1], t[1:]



class VesselMetrics:
    """Pools every non-ignored pixel of every validation image, as vessel papers report.

    Call ``update(logits, target)`` per batch, ``reduce_from_all_processes()`` once
    after the loop (it replaces the local state by the global one, so call it once),
    then ``compute()`` or ``str(metrics)``.

    Vessel = any class other than 0: the hard prediction is ``argmax != 0``, the
    ground truth is ``target != 0`` and the score for the ROC curve is the
    foreground probability ``1 - softmax(logits)[:, 0]``.

    Pixel counts barely see a missed thin vessel, which holds few pixels. The
    centreline scores do: ``cl_recall`` is the share of the label's centreline
    (``skeleton.skeletonize``) inside the predicted mask, ``cl_precision`` the
    share of the prediction's centreline inside the label, ``cldice`` their
    harmonic mean (Shit et al., CVPR 2021), each pooled over the images' centreline
    pixels like the pixel counts. Thinning runs until nothing changes, which the
    host must check, so ``update`` only keeps the batch's two masks (bool, as the
    labels) and they are thinned once, when the counts are first needed.

    AUC is the Mann-Whitney statistic: the fraction of (vessel, background) pixel
    pairs in which the vessel pixel scores higher, ties counting 1/2. We keep the
    float32 score of every pixel and count exactly at ``compute()`` by sorting.
    A histogram of the distinct float32 values would need ~1e9 bins for [0, 1] (or
    a data-dependent ``unique`` per batch, which syncs with the host), and binned
    ROC curves are only approximate; DRIVE validation is a few million pixels
    (~5 bytes each), so storing them is cheap and exact.
    """

    NAMES = ("sensitivity", "specificity", "accuracy", "f1", "auc", "cl_recall", "cl_precision", "cldice")
    COUNTS = 8  # tp, fp, tn, fn, then the four centreline counts

    def __init__(self, ignore_index=IGNORE_INDEX):
        self.ignore_index = ignore_index
        self.reset()

    def reset(self):
        self.counts = None  # int64 [tp, fp, tn, fn] + skeleton.centreline_counts, on the logits' device
        self.scores = []  # float32 foreground probability per pixel; -1 marks an ignored pixel
        self.labels = []  # bool ground truth per pixel
        self.unthinned = []  # (predicted, labelled) vessel masks [N, H, W] inside the FOV, not yet counted

    @torch.no_grad()
    def update(self, logits, target):
        """Accumulate one batch: logits [N, C, H, W] (C >= 2), target [N, H, W] class indices."""
        if logits.dim() != 4 or logits.shape[1] < 2 or target.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(f"expected logits [N, C>=2, H, W] and target [N, H, W], "
                             f"got {tuple(logits.shape)} and {tuple(target.shape)}")
        logits = logits.float()
        target = target.to(logits.device)
        valid = target != self.ignore_index
        pred = logits.argmax(1) != 0
        gt = target != 0
        # Masked sums instead of x[mask]: boolean indexing would wait for the GPU
        # to know the output size; these stay asynchronous.
        counts = torch.stack([
            (valid & pred & gt).sum(), (valid & pred & ~gt).sum(),
            (valid & ~pred & ~gt).sum(), (valid & ~pred & gt).sum(),
        ])
        counts = torch.cat([counts, torch.zeros_like(counts)])  # the centreline's, once thinned
        self.counts = counts if self.counts is None else self.counts + counts
        self.unthinned.append((pred & valid, gt & valid))
        # Ignored pixels are kept with a -1 sentinel (probabilities lie in [0, 1])
        # and dropped at compute time, for the same reason.
        fg = 1.0 - logits.softmax(1)[:, 0]
        self.scores.append(torch.where(valid, fg, -1.0).flatten())
        self.labels.append(gt.flatten())

    def _valid_pixels(self, device=None):
        if not self.scores:
            return torch.empty(0, device=device), torch.empty(0, dtype=torch.bool, device=device)
        scores, labels = torch.cat(self.scores), torch.cat(self.labels)
        keep = scores != -1.0  # not >= 0: a NaN score must stay and poison the AUC, not vanish
        return scores[keep], labels[keep]

    def _thin(self):
        """Add the centreline counts of the masks kept by ``update``."""
        for pred, gt in self.unthinned:
            self.counts[4:] += centreline_counts(pred, gt).sum(0)
        self.unthinned = []

    def _device(self):
        # A rank that saw no batch still has to join the collectives, on a device its backend accepts.
        return self.counts.device if self.counts is not None else collective_device()

    def reduce_from_all_processes(self):
        """Sum the counts and gather every rank's pixel scores (no-op without torch.distributed)."""
        if not is_dist_avail_and_initialized():
            return
        device = self._device()
        self._thin()
        counts = self.counts
        if counts is None:
            counts = torch.zeros(self.COUNTS, dtype=torch.int64, device=device)
        dist.all_reduce(counts)
        scores, labels = self._valid_pixels(device)
        # One [2, n] float32 tensor (labels 0/1 are exact in float32): one gather instead of two.
        local = torch.stack([scores, labels.float()])
        world = dist.get_world_size()
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([local.shape[1]], dtype=torch.int64, device=device))
        sizes = [int(s) for s in sizes]
        # all_gather needs equal shapes: pad to the largest rank, then trim.
        padded = torch.zeros(2, max(sizes), device=device)
        padded[:, :local.shape[1]] = local
        gathered = [torch.empty_like(padded) for _ in range(world)]
        if max(sizes) > 0:  # every rank sees the same sizes, so all skip or all gather
            dist.all_gather(gathered, padded)
        data = torch.cat([g[:, :n] for g, n in zip(gathered, sizes)], dim=1)
        self.counts, self.scores, self.labels = counts, [data[0]], [data[1] > 0.5]

    def _auc(self):
        scores, labels = self._valid_pixels()
        pos = int(labels.sum())
        neg = labels.numel() - pos
        if pos == 0 or neg == 0 or bool(scores.isnan().any()):
            return float("nan")  # undefined with a single class present (or with NaN scores)
        values, group = torch.unique(scores, sorted=True, return_inverse=True)
        total = torch.bincount(group, minlength=len(values))
        pos_per = torch.bincount(group[labels], minlength=len(values))
        neg_per = total - pos_per
        neg_below = torch.cumsum(neg_per, 0) - neg_per
        # Twice the Mann-Whitney U, in int64: each positive beats the negatives
        # strictly below its value (2 each) and ties with those at it (1 each).
        u2 = int((pos_per * (2 * neg_below + neg_per)).sum())
        return u2 / (2 * pos * neg)  # int / int: one correctly rounded division

    def compute(self):
        """Metrics as Python floats; a ratio with a zero denominator is 0.0, AUC with one class NaN."""
        self._thin()
        counts = self.counts.tolist() if self.counts is not None else [0] * self.COUNTS
        tp, fp, tn, fn = counts[:4]

        def ratio(a, b):
            return a / b if b else 0.0

        return {
            "sensitivity": ratio(tp, tp + fn),
            "specificity": ratio(tn, tn + fp),
            "accuracy": ratio(tp + tn, tp + tn + fp + fn),
            "f1": ratio(2 * tp, 2 * tp + fp + fn),
            "auc": self._auc(),
            **cldice(counts[4:]),
        }

    def __str__(self):
        return format_metrics(self.compute())


class ArteryVeinMetrics:
    """The artery/vein scores, pooled over every non-ignored pixel of every image like ``VesselMetrics``.

    ``artery_f1`` and ``vein_f1``: each class's F1 (dice) over all pixels, the
    other class counting as not it; ``av_accuracy``: the share of the pixels that
    the label calls artery or vein and the prediction calls a vessel (either
    class) whose class is right: how well the vessels found are told apart. The
    label's uncertain vessels are ignored (255) like the outside of the FOV.
    The prediction is the argmax over background, artery and vein.
    """

    NAMES = ("artery_f1", "vein_f1", "av_accuracy")

    def __init__(self, ignore_index=IGNORE_INDEX):
        self.ignore_index = ignore_index
        self.counts = None  # int64 [artery tp, fp, fn, vein tp, fp, fn, A/V right, A/V scored]

    @torch.no_grad()
    def update(self, logits, target):
        """Accumulate one batch: logits [N, 3, H, W] (background, artery, vein), target [N, H, W]."""
        if logits.dim() != 4 or logits.shape[1] != 3:
            raise ValueError(f"expected logits [N, 3, H, W] (background, artery, vein), got {tuple(logits.shape)}")
        self.update_classes(logits.argmax(1), target)

    @torch.no_grad()
    def update_classes(self, pred, target):
        """Accumulate predicted classes (0, 1 artery, 2 vein; any shape, e.g. a thresholded map) against
        ``target`` of the same shape."""
        target = target.to(pred.device)
        valid = target != self.ignore_index
        parts = []
        for cls in (1, 2):
            p, t = valid & (pred == cls), valid & (target == cls)
            parts += [(p & t).sum(), (p & ~t).sum(), (~p & t).sum()]
        scored = valid & (target >= 1) & (target <= 2) & (pred >= 1)
        parts += [(scored & (pred == target)).sum(), scored.sum()]
        counts = torch.stack(parts)
        self.counts = counts if self.counts is None else self.counts + counts

    def reduce_from_all_processes(self):
        if not is_dist_avail_and_initialized():
            return
        counts = self.counts if self.counts is not None else torch.zeros(8, dtype=torch.int64)
        counts = counts.to(collective_device())
        dist.all_reduce(counts)
        self.counts = counts

    def compute(self):
        """The scores as Python floats; a ratio with a zero denominator is 0.0."""
        c = self.counts.tolist() if self.counts is not None else [0] * 8

        def ratio(a, b):
            return a / b if b else 0.0

        return {"artery_f1": ratio(2 * c[0], 2 * c[0] + c[1] + c[2]),
                "vein_f1": ratio(2 * c[3], 2 * c[3] + c[4] + c[5]),
                "av_accuracy": ratio(c[6], c[7])}


def format_metrics(values):
    """``compute()``'s dict as printed and logged: one ``name: value`` line each."""
    return "\n".join(f"{name}: {value:.4f}" for name, value in values.items())
