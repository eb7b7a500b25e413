"""Validation as train.py runs it: one pass over the validation images that returns every metric
(``validate``), the lines it prints, and the per-image CSV of ``--test-only`` (``write_test_metrics``).

The tutorial's plain loop is ``train_and_eval.evaluate``; this one scores the
same dice and confusion matrix on a BatchNorm-folded copy of the model, with
flip averaging and tiles where asked, and adds the vessel metrics and the
per-image rows.
"""
import csv
import os
from dataclasses import dataclass
from typing import Optional

import torch

from . import distributed_utils as utils
from .files import atomic_write
from .inference import FlipAverage, evaluation_log_probs, inference_model
from .metrics import IGNORE_INDEX, ArteryVeinMetrics, ConfusionMatrix, DiceCoefficient, VesselMetrics, format_metrics
from .train_and_eval import to_device

TEST_METRICS_FILE = "test_metrics.csv"
TEST_METRICS_COLUMNS = ("dice",) + VesselMetrics.NAMES  # then ArteryVeinMetrics.NAMES for an artery/vein model


@dataclass
class ValidationResult:
    """What one validation pass measured, reduced over every process."""

    confmat: ConfusionMatrix  # pixel counts: the tutorial's block
    dice: float  # mean over images of each image's foreground dice
    vessel: dict  # VesselMetrics.compute() (and ArteryVeinMetrics.compute() with 3 classes): pixels pooled
    rows: Optional[list] = None  # with per_image: [(image file name, {"dice": ..., **vessel metrics})], dataset order

    def report(self):
        """Print the tutorial's confusion-matrix block, ``dice coefficient: x`` and the vessel metrics."""
        print(self.confmat)
        print(f"dice coefficient: {self.dice:.3f}")
        print(format_metrics(self.vessel))

    def text(self):
        """The epoch's block in the results file: ``dice coefficient: x``, the confusion matrix, the metrics."""
        return f"dice coefficient: {self.dice:.3f}\n{self.confmat}\n{format_metrics(self.vessel)}\n"

    def record(self):
        """The numbers as plain data, for log.jsonl."""
        return {"dice": self.dice, **self.confmat.summary(), **self.vessel}


class DatasetResults:
    """The validation of a model trained on several datasets: each dataset's ``ValidationResult`` (a list of
    (name, result)), and their mean, which picks ``best_model.pth``: every dataset counts the same,
    however many images it has."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.dice = sum(r.dice for _, r in self.parts) / len(self.parts)

    def summary_line(self):
        return (f"mean dice coefficient over the {len(self.parts)} datasets "
                f"({', '.join(name for name, _ in self.parts)}): {self.dice:.3f}")

    def text(self):
        blocks = [f"dataset {name}:\n{r.text()}" for name, r in self.parts]
        return "".join(blocks) + self.summary_line() + "\n"

    def record(self):
        """The mean over datasets of every number (lists element by element), and each dataset's own."""
        records = [r.record() for _, r in self.parts]
        mean = {k: _mean([rec[k] for rec in records]) for k in records[0]}
        return {**mean, "dice": self.dice, "datasets": {name: rec for (name, _), rec in zip(self.parts, records)}}


def _mean(values):
    if isinstance(values[0], list):
        return [_mean(list(column)) for column in zip(*values)]
    return sum(values) / len(values)


@torch.no_grad()
def validate(model, data_loader, device, num_classes, *, tta=False, tile_size=0, multiple=16,
             channels_last=True, per_image=False, av=False) -> ValidationResult:
    """Score ``model`` on every image of ``data_loader`` (on every process its share) and return the result.

    Validation runs in float32 whatever ``--amp`` says (as the tutorial's): the
    dice, the AUC and the choice of ``best_model.pth`` must not depend on it.
    It runs on a copy of ``model`` with BatchNorm folded into the convolutions,
    in channels_last unless ``channels_last`` is False; images larger than
    ``tile_size`` are predicted in tiles of a size divisible by ``multiple``
    (``inference.evaluation_log_probs``). With ``tta`` every metric scores the
    softmax averaged over the image and its two flips (``--tta``).
    Metrics accumulate on the device (no per-image host sync) and are reduced
    across processes once at the end; the AUC sorts every validation pixel, so
    it is computed once. ``per_image`` also scores each image on its own (one
    host sync per image) and gathers those rows from every process. ``av``: the classes are background,
    artery and vein, and the artery/vein scores (``ArteryVeinMetrics``) are added.
    """
    eval_model = inference_model(model, channels_last)
    if tta:
        eval_model = FlipAverage(eval_model, channels_last)
    confmat = ConfusionMatrix(num_classes)
    dice = DiceCoefficient(num_classes=num_classes, ignore_index=IGNORE_INDEX)
    vessel = _pixel_metrics(av)
    rows = []
    metric_logger = utils.MetricLogger(delimiter="  ")
    for image, target in metric_logger.log_every(data_loader, 100, "Test:"):
        image, target = to_device(image, target, device, channels_last)
        log_probs = evaluation_log_probs(eval_model, image, tile_size, multiple=multiple, channels_last=channels_last,
                                         size=target.shape[-2:])
        confmat.update(target.flatten(), log_probs.argmax(1).flatten())
        dice.update(log_probs, target)
        for m in vessel:
            m.update(log_probs, target)
        if per_image:
            rows += _image_rows(log_probs, target, num_classes, av)
    confmat.reduce_from_all_processes()
    dice.reduce_from_all_processes()
    for m in vessel:
        m.reduce_from_all_processes()
    return ValidationResult(confmat, dice.value.item(), {k: v for m in vessel for k, v in m.compute().items()},
                            _gather_image_rows(data_loader, rows) if per_image else None)


def _pixel_metrics(av):
    """The pooled metrics: the vessel metrics, and for a model of background, artery and vein (``av``) the
    artery/vein scores."""
    metrics = [VesselMetrics(ignore_index=IGNORE_INDEX)]
    if av:
        metrics.append(ArteryVeinMetrics(ignore_index=IGNORE_INDEX))
    return metrics


def _image_rows(log_probs, target, num_classes, av=False):
    """Each image of the batch scored on its own: ``{"dice": ..., **vessel metrics}``, in batch order."""
    rows = []
    for k in range(log_probs.shape[0]):
        one_dice = DiceCoefficient(num_classes=num_classes, ignore_index=IGNORE_INDEX)
        one_dice.update(log_probs[k:k + 1], target[k:k + 1])
        row = {"dice": one_dice.value.item()}
        for one in _pixel_metrics(av):
            one.update(log_probs[k:k + 1], target[k:k + 1])
            row.update(one.compute())
        rows.append(row)
    return rows


def _gather_image_rows(data_loader, rows):
    """Every process's per-image rows, as (image file name, row) in the dataset's order (on every process).

    The rows were appended image by image in loader order, which is the order of
    the batch sampler's indices, batch after batch, whatever the batch size. The
    sampler must give that order again when asked (validation's
    ``SequentialSampler`` and ``ShardedEvalSampler`` do; a shuffling one would not).
    """
    indices = [i for batch in data_loader.batch_sampler for i in batch]
    pairs = list(zip(indices, rows))
    if utils.is_dist_avail_and_initialized():
        gathered = [None] * utils.get_world_size()
        torch.distributed.all_gather_object(gathered, pairs)
        pairs = [p for part in gathered for p in part]
    names = data_loader.dataset.img_list
    return [(os.path.basename(names[i]), row) for i, row in sorted(pairs, key=lambda p: p[0])]


def write_test_metrics(output_dir, result, dataset=""):
    """``test_metrics.csv`` of a ``validate(..., per_image=True)`` result (of ``dataset``) or of a
    ``DatasetResults``: per dataset a row per image (its dice and vessel metrics), then ``pooled``, the
    printed values. Returns its path."""
    parts = result.parts if isinstance(result, DatasetResults) else [(dataset, result)]
    if any(r.rows is None for _, r in parts):
        raise ValueError("write_test_metrics needs the per-image rows: validate(..., per_image=True)")
    path = os.path.join(output_dir, TEST_METRICS_FILE)
    columns = TEST_METRICS_COLUMNS + tuple(k for k in ArteryVeinMetrics.NAMES if k in parts[0][1].vessel)

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(("dataset", "image") + columns)
            for name, r in parts:
                for image, row in r.rows + [("pooled", {"dice": r.dice, **r.vessel})]:
                    w.writerow([name, image] + [f"{row[k]:.6f}" for k in columns])

    atomic_write(path, write)
    return path
