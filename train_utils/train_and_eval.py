"""The tutorial's training engine: the loss (``criterion``), one training epoch, the tutorial's evaluation,
the optimiser and the LR schedule.

Validation as train.py runs it (BatchNorm folded, flips, tiles, vessel metrics,
per-image rows) is ``train_utils.evaluation.validate``; ``evaluate`` here is the
tutorial's plain loop.
"""
import math

import torch
import torch.nn.functional as F

from . import distributed_utils as utils
from .dice_coefficient_loss import build_target, dice_loss
from .errors import UserError
from .imaging import VESSEL_ANY
from .metrics import IGNORE_INDEX, ConfusionMatrix, DiceCoefficient
from .skeleton import skeleton_recall_loss


def criterion(inputs, target, loss_weight=None, num_classes: int = 2, dice: bool = True, ignore_index: int = -100,
              skeleton_recall: float = 0.0):
    """Cross-entropy (+ multiclass dice loss) of every model output; ``aux`` weighs 0.5.

    ``skeleton_recall`` > 0 adds that weight of ``skeleton.skeleton_recall_loss``
    (``--skeleton-recall``; 0, the tutorial's criterion, by default). The loss is
    computed in float32 whatever dtype autocast gave the logits. With more than two
    classes, a target pixel ``VESSEL_ANY`` (a vessel-only dataset's vessel in an
    artery/vein run) is "any class but the background": -log(1 - P(background)) in the
    cross-entropy, left out of the dice.
    """
    losses = {}
    for name, x in inputs.items():
        x = x.float()
        if x.shape[1] > 2 and ignore_index >= 0:
            loss, known = _cross_entropy_with_any_vessel(x, target, loss_weight, ignore_index)
        else:
            loss, known = F.cross_entropy(x, target, ignore_index=ignore_index, weight=loss_weight), target
        if dice:
            dice_target = build_target(known, num_classes, ignore_index)
            loss = loss + dice_loss(x, dice_target, multiclass=True, ignore_index=ignore_index)
        if skeleton_recall:
            loss = loss + skeleton_recall * skeleton_recall_loss(x, target, ignore_index)
        losses[name] = loss
    if len(losses) == 1:
        return losses["out"]
    return losses["out"] + 0.5 * losses["aux"]


def _cross_entropy_with_any_vessel(x, target, loss_weight, ignore_index):
    """(the tutorial's weighted mean cross-entropy, the target with ``VESSEL_ANY`` pixels ignored): a pixel
    whose label says only "a vessel" (a vessel-only dataset in an artery/vein run) adds -log(1 - P(background))
    instead, counted as one pixel of weight 1. Without such pixels the value is the tutorial's."""
    any_vessel = target == VESSEL_ANY
    known = torch.where(any_vessel, ignore_index, target)
    valid = known != ignore_index
    ce_sum = F.cross_entropy(x, known, ignore_index=ignore_index, weight=loss_weight, reduction="sum")
    weights = valid.float() if loss_weight is None else torch.where(
        valid, loss_weight[known.clamp(max=x.shape[1] - 1)], 0)
    log_vessel = torch.logsumexp(x[:, 1:], dim=1) - torch.logsumexp(x, dim=1)  # log(1 - P(background))
    any_sum = -torch.where(any_vessel, log_vessel, 0).sum()
    return (ce_sum + any_sum) / (weights.sum() + any_vessel.sum()), known


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite: training stops instead of writing garbage weights."""


def to_device(image, target, device, channels_last=False):
    """A batch on ``device``; the image in channels_last memory format if asked."""
    image = image.to(device, non_blocking=True)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    return image, target.to(device, non_blocking=True)


def train_one_epoch(model, optimizer, data_loader, device, epoch, num_classes, lr_scheduler, print_freq=10,
                    scaler=None, *, amp_dtype=None, channels_last=False, skeleton_recall=0.0):
    """One pass over ``data_loader``; returns (mean training loss over steps and processes, last lr).

    The tutorial's signature and call: ``num_classes`` counts the background,
    and passing a ``scaler`` turns on float16 autocast (the tutorial's
    ``autocast(enabled=scaler is not None)``). train.py also names
    ``amp_dtype`` (float16, bfloat16, or None for float32), which decides
    autocast, and passes a ``torch.amp.GradScaler`` that may be disabled, so
    the step has no branches, and the weight of the skeleton recall loss
    (``criterion``'s ``skeleton_recall``).
    """
    model.train()
    if amp_dtype is None and scaler is not None and scaler.is_enabled():
        amp_dtype = torch.float16
    metric_logger = utils.MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"
    if scaler is None:
        scaler = torch.amp.GradScaler(device.type, enabled=False)

    loss_weight = torch.as_tensor([1.0, 2.0], device=device) if num_classes == 2 else None
    lr = optimizer.param_groups[0]["lr"]
    for step, (image, target) in enumerate(metric_logger.log_every(data_loader, print_freq, header)):
        image, target = to_device(image, target, device, channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            output = model(image)
            loss = criterion(output, target, loss_weight, num_classes=num_classes, ignore_index=IGNORE_INDEX,
                             skeleton_recall=skeleton_recall)

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()

        # The one host sync per step: the loss for the log, averaged over processes, so every
        # process sees the same value and all stop together if it is not finite.
        loss_value = utils.reduce_mean(loss.detach()).item()
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(f"training loss is {loss_value} at epoch {epoch}, step {step}; stopping "
                                     "(try a lower --lr, or run without --amp)")
        lr = optimizer.param_groups[0]["lr"]
        metric_logger.update(loss=loss_value, lr=lr)

    return metric_logger.meters["loss"].global_avg, lr


@torch.no_grad()
def evaluate(model, data_loader, device, num_classes):
    """The tutorial's validation: returns (reduced ``ConfusionMatrix``, mean per-image dice as a float).

    Plain forward passes of ``model`` as it is (float32, no autocast); the
    metrics accumulate on the device and are all-reduced once at the end.
    train.py validates with ``evaluation.validate``, which scores the same way
    on a BatchNorm-folded copy, with flips, tiles and the vessel metrics.
    """
    model.eval()
    confmat = ConfusionMatrix(num_classes)
    dice = DiceCoefficient(num_classes=num_classes, ignore_index=IGNORE_INDEX)
    metric_logger = utils.MetricLogger(delimiter="  ")
    for image, target in metric_logger.log_every(data_loader, 100, "Test:"):
        image, target = to_device(image, target, device)
        output = model(image)["out"]
        confmat.update(target.flatten(), output.argmax(1).flatten())
        dice.update(output, target)
    confmat.reduce_from_all_processes()
    dice.reduce_from_all_processes()
    return confmat, dice.value.item()


def build_optimizer(params, opt, lr, momentum, weight_decay):
    """SGD with momentum (the tutorial's) or AdamW (decoupled weight decay)."""
    if opt == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def create_lr_scheduler(optimizer, num_step: int, epochs: int, warmup=True, warmup_epochs=1,
                        warmup_factor=1e-3, schedule="poly"):
    """Per-step LR factor: linear warm-up from ``warmup_factor`` to 1, then ``(1 - progress) ** 0.9`` ("poly",
    the tutorial's) or ``(1 + cos(pi * progress)) / 2`` ("cosine")."""
    assert num_step > 0 and epochs > 0
    if schedule not in ("poly", "cosine"):
        raise ValueError(f"unknown LR schedule {schedule!r}")
    if warmup is False:
        warmup_epochs = 0
    warmup_steps = warmup_epochs * num_step
    # The tutorial divides by (epochs - warmup_epochs) * num_step, zero when the run is all warm-up.
    decay_steps = max((epochs - warmup_epochs) * num_step, 1)

    def f(x):
        if warmup is True and x <= warmup_steps:
            alpha = float(x) / warmup_steps
            return warmup_factor * (1 - alpha) + alpha
        progress = min((x - warmup_steps) / decay_steps, 1.0)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return (1 - progress) ** 0.9

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=f)
