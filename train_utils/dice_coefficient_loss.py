"""Dice coefficient and dice loss, vectorised over images and classes.

The formula is the tutorial's, per image (and per class): over the pixels that
are not ``ignore_index``,

    d = (2 * inter + eps) / (sum_x + sum_t + eps),  with sum_x + sum_t == 0
    treated as 2 * inter,

averaged over images (then over classes). The tutorial loops in Python and
calls ``if sets_sum == 0`` per image and class, which stalls a GPU on the host
every time; here everything is one batched reduction with no host sync.
"""
import torch
import torch.nn.functional as F


def build_target(target: torch.Tensor, num_classes: int = 2, ignore_index: int = -100) -> torch.Tensor:
    """One-hot float [N, C, H, W] target for the dice, as the tutorial's; ignored pixels are ``ignore_index`` in
    every channel."""
    if ignore_index < 0:
        return F.one_hot(target, num_classes).float().permute(0, 3, 1, 2)
    # torch.where instead of boolean-mask assignment, which syncs with the host on CUDA.
    ignore_mask = target == ignore_index
    dice_target = F.one_hot(torch.where(ignore_mask, 0, target), num_classes).float()
    dice_target = torch.where(ignore_mask.unsqueeze(-1), float(ignore_index), dice_target)
    return dice_target.permute(0, 3, 1, 2)


def dice_per_item(x: torch.Tensor, target: torch.Tensor, ignore_index: int, epsilon: float, keep_dims: int):
    """Dice of each of the first ``keep_dims`` dims' entries, reducing over the rest."""
    target = target.to(x.dtype)
    if ignore_index >= 0:
        roi = target != ignore_index
        # where(), not multiplication: the ignored entries of x must not leak in even if non-finite.
        x = torch.where(roi, x, 0)
        target = torch.where(roi, target, 0)
    dims = tuple(range(keep_dims, x.dim()))
    inter = (x * target).sum(dim=dims)
    sets_sum = x.sum(dim=dims) + target.sum(dim=dims)
    sets_sum = torch.where(sets_sum == 0, 2 * inter, sets_sum)
    return (2 * inter + epsilon) / (sets_sum + epsilon)


def dice_coeff(x: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, epsilon: float = 1e-6):
    """Average over the batch of each image's dice, all remaining dims pooled."""
    return dice_per_item(x, target, ignore_index, epsilon, keep_dims=1).mean()


def multiclass_dice_coeff(x: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, epsilon: float = 1e-6):
    """Average over classes of the batch-averaged per-image dice of each class channel."""
    return dice_per_item(x, target, ignore_index, epsilon, keep_dims=2).mean(dim=0).mean()


def dice_loss(x: torch.Tensor, target: torch.Tensor, multiclass: bool = False, ignore_index: int = -100):
    """1 - dice of the softmax probabilities; always computed in float32 (bf16/fp16/fp64 logits are fine)."""
    x = F.softmax(x.float(), dim=1)
    fn = multiclass_dice_coeff if multiclass else dice_coeff
    return 1 - fn(x, target, ignore_index=ignore_index)
