"""Vessel metrics inside the FOV (sensitivity, specificity, accuracy, F1, exact ROC AUC), pooled over all images."""
import torch
import torch.distributed as dist

from .distributed_utils import collective_device


class VesselMetrics:
    """Pools every non-ignored pixel of every validation image, as vessel papers report.

    Call ``update(logits, target)`` per batch, ``reduce_from_all_processes()`` once
    after the loop (it replaces the local state by the global one, so call it once),
    then ``compute()`` or ``str(metrics)``.

    Vessel = any class other than 0: the hard prediction is ``argmax != 0``, the
    ground truth is ``target != 0`` and the score for the ROC curve is the
    foreground probability ``1 - softmax(logits)[:, 0]``.

    AUC is the Mann-Whitney statistic: the fraction of (vessel, background) pixel
    pairs in which the vessel pixel scores higher, ties counting 1/2. We keep the
    float32 score of every pixel and count exactly at ``compute()`` by sorting.
    A histogram of the distinct float32 values would need ~1e9 bins for [0, 1] (or
    a data-dependent ``unique`` per batch, which syncs with the host), and binned
    ROC curves are only approximate; DRIVE validation is a few million pixels
    (~5 bytes each), so storing them is cheap and exact.
    """

    NAMES = ("sensitivity", "specificity", "accuracy", "f1", "auc")

    def __init__(self, ignore_index=255):
        self.ignore_index = ignore_index
        self.reset()

    def reset(self):
        self.counts = None  # int64 [tp, fp, tn, fn], on the logits' device
        self.scores = []  # float32 foreground probability per pixel; -1 marks an ignored pixel
        self.labels = []  # bool ground truth per pixel

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
        self.counts = counts if self.counts is None else self.counts + counts
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

    def _device(self):
        # A rank that saw no batch still has to join the collectives, on a device its backend accepts.
        return self.counts.device if self.counts is not None else collective_device()

    def reduce_from_all_processes(self):
        """Sum the counts and gather every rank's pixel scores (no-op without torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        device = self._device()
        counts = self.counts if self.counts is not None else torch.zeros(4, dtype=torch.int64, device=device)
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
        tp, fp, tn, fn = self.counts.tolist() if self.counts is not None else (0, 0, 0, 0)

        def ratio(a, b):
            return a / b if b else 0.0

        return {
            "sensitivity": ratio(tp, tp + fn),
            "specificity": ratio(tn, tn + fp),
            "accuracy": ratio(tp + tn, tp + tn + fp + fn),
            "f1": ratio(2 * tp, 2 * tp + fp + fn),
            "auc": self._auc(),
        }

    def __str__(self):
        return format_metrics(self.compute())


def format_metrics(values):
    """``compute()``'s dict as printed and logged: one ``name: value`` line each."""
    return "\n".join(f"{name}: {value:.4f}" for name, value in values.items())
