"""The training engine: the loss (``criterion``), one training epoch, evaluation, and the LR schedule."""
import math

import torch
import torch.nn.functional as F

from . import distributed_utils as utils
from .dice_coefficient_loss import build_target, dice_loss
from .errors import UserError
from .inference import evaluation_logits
from .metrics import IGNORE_INDEX, ConfusionMatrix, DiceCoefficient, VesselMetrics


def criterion(inputs, target, loss_weight=None, num_classes: int = 2, dice: bool = True, ignore_index: int = -100):
    """Cross-entropy (+ multiclass dice loss) of every model output; ``aux`` weighs 0.5.

    The loss is computed in float32 whatever dtype autocast gave the logits.
    """
    losses = {}
    for name, x in inputs.items():
        x = x.float()
        loss = F.cross_entropy(x, target, ignore_index=ignore_index, weight=loss_weight)
        if dice:
            dice_target = build_target(target, num_classes, ignore_index)
            loss = loss + dice_loss(x, dice_target, multiclass=True, ignore_index=ignore_index)
        losses[name] = loss
    if len(losses) == 1:
        return losses["out"]
    return losses["out"] + 0.5 * losses["aux"]


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite: training stops instead of writing garbage weights."""


def cpu_has_native_bf16():
    """Does this CPU multiply bfloat16 in hardware (AMX tiles or AVX512-BF16)?

    Only there is bfloat16 autocast faster than float32 on the CPU (a U-Net
    training step 2.6-3.6x faster with AMX, in channels_last:
    ``benchmarks/benchmark.py --mode precision``); elsewhere oneDNN emulates
    it, slower than float32.
    """
    try:
        return bool(torch.backends.mkldnn.is_available()
                    and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()))
    except AttributeError:  # a PyTorch without these probes: assume the common case, no bfloat16 hardware
        return False


def autocast_dtype(device, amp, dtype=None):
    """The autocast dtype for ``--amp``: ``dtype`` if named, else float16 on CUDA and bfloat16 on the CPU.

    None without AMP. ``amp="auto"`` (the fast recipe's) turns AMP on only where
    it is faster: on CUDA, and on CPUs with bfloat16 hardware.
    """
    if amp == "auto":
        amp = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    if not amp:
        return None
    if dtype:
        return getattr(torch, dtype)
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def _to_device(image, target, device, channels_last):
    image = image.to(device, non_blocking=True)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    return image, target.to(device, non_blocking=True)


def train_one_epoch(model, optimizer, data_loader, device, epoch, num_classes,
                    lr_scheduler, print_freq=10, scaler=None, amp_dtype=None, channels_last=False):
    """One pass over ``data_loader``; returns (mean training loss over steps and processes, last lr).

    ``num_classes`` counts the background. AMP runs when ``amp_dtype`` is given;
    ``scaler`` (a ``torch.amp.GradScaler``) may be disabled, so the step has no branches.
    """
    model.train()
    metric_logger = utils.MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"
    if scaler is None:
        scaler = torch.amp.GradScaler(device.type, enabled=False)

    loss_weight = torch.as_tensor([1.0, 2.0], device=device) if num_classes == 2 else None
    lr = optimizer.param_groups[0]["lr"]
    for step, (image, target) in enumerate(metric_logger.log_every(data_loader, print_freq, header)):
        image, target = _to_device(image, target, device, channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            output = model(image)
            loss = criterion(output, target, loss_weight, num_classes=num_classes, ignore_index=255)

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
def evaluate(model, data_loader, device, num_classes, channels_last=False, vessel_metrics=None, print_freq=100,
             tile_size=0, multiple=16, per_image=None):
    """Validation: returns (reduced ``ConfusionMatrix``, dice as a float).

    Always float32, as the tutorial's, also when training uses ``--amp``: the
    dice, the AUC and the choice of ``best_model.pth`` must not depend on it.
    Metrics accumulate on the device (no per-image host sync) and are
    all-reduced once at the end. Pass a ``VesselMetrics`` as ``vessel_metrics``
    to fill it too. Images larger than ``tile_size`` are predicted in tiles
    (``inference.evaluation_logits``). A list passed as ``per_image`` receives
    one dict per image of this process, in loader order: its dice and its
    vessel metrics.
    """
    model.eval()
    confmat = ConfusionMatrix(num_classes)
    dice = DiceCoefficient(num_classes=num_classes, ignore_index=255)
    metric_logger = utils.MetricLogger(delimiter="  ")
    for image, target in metric_logger.log_every(data_loader, print_freq, "Test:"):
        image, target = _to_device(image, target, device, channels_last)
        output = evaluation_logits(model, image, tile_size, multiple=multiple, channels_last=channels_last)
        confmat.update(target.flatten(), output.argmax(1).flatten())
        dice.update(output, target)
        if vessel_metrics is not None:
            vessel_metrics.update(output, target)
        if per_image is not None:
            for k in range(output.shape[0]):
                one_dice = DiceCoefficient(num_classes=num_classes, ignore_index=255)
                one_dice.update(output[k:k + 1], target[k:k + 1])
                one = VesselMetrics(ignore_index=255)
                one.update(output[k:k + 1], target[k:k + 1])
                per_image.append({"dice": one_dice.value.item(), **one.compute()})
    confmat.reduce_from_all_processes()
    dice.reduce_from_all_processes()
    if vessel_metrics is not None:
        vessel_metrics.reduce_from_all_processes()
    return confmat, dice.value.item()


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
