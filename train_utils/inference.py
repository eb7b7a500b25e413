"""Inference on whole photographs: sliding-window prediction with blended tiles, and the model's fused eval form.

``predict_probabilities`` runs a segmentation model over images of any size in
memory bounded by the tile size: the (padded) image is cut into overlapping
tiles, each tile's softmax is weighted by a raised-cosine window that falls
towards the tile's inner edges (where the network sees the least context) and
the weighted sum is normalised, so no seams remain. An image that fits in one
tile is predicted whole, with the same code.
"""
import copy
import math

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .errors import UserError
from .transforms import normalize_image


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm folded into the convolution before it.

    In evaluation BatchNorm is a fixed per-channel affine map, so it can live in
    the convolution's weights and bias: one pass over each activation less
    (about 16% of a U-Net forward on the CPU), the same outputs up to float
    rounding (~1e-7). Pairs are found inside ``nn.Sequential`` blocks (the U-Net's
    ``DoubleConv``, torchvision's conv-BN-activation blocks); the folded BN
    becomes ``nn.Identity``. The original model is not touched.
    """
    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats
                    and bn.running_mean is not None):
                module._modules[a] = fuse_conv_bn_eval(conv, bn)
                module._modules[b] = nn.Identity()
    return fused


def inference_model(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """The fastest exact form of ``model`` for evaluation: BatchNorm folded in, channels_last if asked."""
    fused = fuse_conv_bn(model)
    return fused.to(memory_format=torch.channels_last) if channels_last else fused


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


def window_starts(length: int, tile: int, overlap: int, multiple: int = 16):
    """Start offsets and size of the windows covering ``[0, length)``: one window when it fits, else the
    fewest windows of at most ``tile`` that overlap by at least ``overlap``, all of one size (a multiple of
    ``multiple``), spread evenly from the start to the end. Equal windows cost what the image needs: an
    image a little larger than ``tile`` takes two windows of about half its size, not two of ``tile``."""
    if length <= tile:
        return [0], length
    n = math.ceil((length - overlap) / (tile - overlap))
    size = min(tile, _ceil_to(math.ceil((length + (n - 1) * overlap) / n), multiple))
    return [(length - size) * i // (n - 1) for i in range(n)], size


def blend_weights(start: int, size: int, length: int, overlap: int) -> torch.Tensor:
    """1-D weight of one window: 1 inside, a raised-cosine ramp over ``overlap`` pixels on every side that
    borders another window (never at the image's edges, which no other window covers). Always > 0."""
    w = torch.ones(size, dtype=torch.float64)
    ramp_len = min(overlap, size)
    if ramp_len > 0:
        ramp = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(ramp_len, dtype=torch.float64) + 0.5) / ramp_len)
        if start > 0:
            w[:ramp_len] = torch.minimum(w[:ramp_len], ramp)
        if start + size < length:
            w[size - ramp_len:] = torch.minimum(w[size - ramp_len:], ramp.flip(0))
    return w.float()


def tile_grid(height: int, width: int, tile_size: int, tile_overlap: int, multiple: int = 16):
    """The windows that cover an image: (list of (y, x, h, w), overlap in pixels).

    An image that fits in one tile (or ``tile_size <= 0``) is one window of the
    whole image: the U-Net's ``align_corners=True`` upsampling makes its output
    depend on the input size, so only the whole, unpadded image gives the
    prediction that evaluation scores. Larger images are cut into tiles of at
    most ``tile_size`` whose size and overlap are rounded to ``multiple`` (the
    model's pooling divides them evenly), spread evenly with the last one flush
    with the image's end (``window_starts``), so nothing is padded.
    """
    tile = max(multiple, tile_size // multiple * multiple)
    if tile_size <= 0 or (height <= tile and width <= tile):
        return [(0, 0, height, width)], 0
    overlap = min(_ceil_to(max(tile_overlap, 0), multiple), tile - multiple)
    ys, th = window_starts(height, tile, overlap, multiple)
    xs, tw = window_starts(width, tile, overlap, multiple)
    return [(y, x, th, tw) for y in ys for x in xs], overlap


def forward_probs(model, x, amp_dtype=None, tta=False, channels_last=False):
    """Softmax (float32) of the model's ``out`` for a normalised batch; with ``tta`` the mean over the
    image, its horizontal flip and its vertical flip."""
    views = [(), (3,), (2,)] if tta else [()]
    total = None
    for dims in views:
        xi = x.flip(dims) if dims else x
        if channels_last:
            xi = xi.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = model(xi)["out"]
        p = logits.float().softmax(dim=1)
        if dims:
            p = p.flip(dims)
        total = p if total is None else total.add_(p)
    return total.div_(len(views)) if tta else total


class FlipAverage(nn.Module):
    """Evaluation with flip averaging: the mean softmax over the image, its horizontal and its vertical flip.

    Returns ``{"out": log(mean probability)}``, log-probabilities where a model returns logits: their
    argmax and softmax are those of the averaged probabilities, so the dice, the confusion matrix and
    the AUC all score the averaged prediction, exactly as ``predict.py --tta`` computes it.
    """

    def __init__(self, model, channels_last=False):
        super().__init__()
        self.model = model
        self.channels_last = channels_last

    def forward(self, x):
        probs = forward_probs(self.model, x, tta=True, channels_last=self.channels_last)
        return {"out": probs.clamp_min(1e-30).log()}


@torch.inference_mode()
def predict_probabilities(model, images: torch.Tensor, mean, std, tile_size=1024, tile_overlap=128,
                          batch_size=1, multiple=16, amp_dtype=None, tta=False, channels_last=False):
    """Class probabilities ``[N, C, H, W]`` (float32, on the model's device) for uint8 images ``[N, 3, H, W]``
    (or images already normalised, with ``mean=None``).

    The images stay where they are (the CPU, typically); only tiles of at most
    ``tile_size`` pixels, ``batch_size`` at a time, go to the device, and the
    device holds the ``N x C x H x W`` accumulator. Nothing is padded: an
    image that fits in one tile is predicted whole, exactly as evaluation
    does. Returns (probabilities, number of tiles per image).
    """
    device = next(model.parameters()).device
    n, _, h, w = images.shape
    windows, overlap = tile_grid(h, w, tile_size, tile_overlap, multiple)
    step = max(1, batch_size)
    if len(windows) == 1:  # whole images: every blend weight would be 1, so their probabilities as they come
        parts = [forward_probs(model, _on_device(images[k:k + step], device, mean, std), amp_dtype, tta,
                               channels_last) for k in range(0, n, step)]
        return (parts[0] if len(parts) == 1 else torch.cat(parts)), 1

    def window_weight(y, x, th, tw):  # rebuilt per use: storing one per tile would grow with the image
        wy, wx = blend_weights(y, th, h, overlap), blend_weights(x, tw, w, overlap)
        return (wy[:, None] * wx[None, :]).to(device)

    weight_sum = torch.zeros(h, w, device=device)
    for y, x, th, tw in windows:
        weight_sum[y:y + th, x:x + tw] += window_weight(y, x, th, tw)
    jobs = [(i, y, x, th, tw) for i in range(n) for (y, x, th, tw) in windows]
    acc = None
    for k in range(0, len(jobs), step):
        chunk = jobs[k:k + step]
        batch = torch.stack([images[i, :, y:y + th, x:x + tw] for i, y, x, th, tw in chunk])
        probs = forward_probs(model, _on_device(batch, device, mean, std), amp_dtype, tta, channels_last)
        if acc is None:
            acc = torch.zeros(n, probs.shape[1], h, w, device=device)
        for p, (i, y, x, th, tw) in zip(probs, chunk):
            acc[i, :, y:y + th, x:x + tw] += p * window_weight(y, x, th, tw)
    acc /= weight_sum
    return acc, len(windows)


def _on_device(batch, device, mean, std):
    """A batch of images on ``device``, normalised there (``mean`` None: it is already)."""
    batch = batch.to(device, non_blocking=True)
    return batch if mean is None else normalize_image(batch, mean, std)


# How a prediction made at the working scale goes back to the photograph's size: its probabilities resized
# ("probability"), or its log-probabilities resized and normalised again ("log", what validation and
# predict.py do: thin vessels keep their width; docs/model_card.md measures both).
RESIZE_SPACES = ("probability", "log")
BACK_TO_SIZE = "log"


def probabilities_at(probs: torch.Tensor, size, space=BACK_TO_SIZE) -> torch.Tensor:
    """Class probabilities ``[N, C, h, w]`` resized (bilinearly) to ``size`` = (H, W): a prediction made on a
    photograph rescaled for ``--fov-diameter``, back at the photograph's own size, where it is scored and
    written. Bilinear weights sum to 1, so the result is still a distribution per pixel.

    ``space="log"`` resizes the log-probabilities and normalises again (for two classes: the vessel logit is
    interpolated). A vessel narrower than two working pixels is one or two pixels of moderate vessel
    probability between confident background: resized probabilities draw it about two working pixels wide,
    whereas interpolated logits cross zero near the moderate pixels, so it is drawn about as wide as its
    contrast says."""
    if tuple(probs.shape[-2:]) == tuple(size):
        return probs
    if space == "log":
        logp = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
        out = nn.functional.interpolate(logp, size=tuple(size), mode="bilinear", align_corners=False)
        # softmax in place: a full-size photograph's map is not copied again
        return out.sub_(out.amax(1, keepdim=True)).exp_().div_(out.sum(1, keepdim=True))
    return nn.functional.interpolate(probs, size=tuple(size), mode="bilinear", align_corners=False)


def evaluation_log_probs(model, images, tile_size=0, tile_overlap=128, multiple=16, channels_last=False,
                         size=None):
    """What validation scores for a normalised batch ``[N, 3, H, W]``: float32 log-probabilities, up to a
    constant per pixel, so their argmax is the predicted class and their softmax its probabilities.

    Smaller images (or ``tile_size`` 0) get one plain forward pass, as the
    tutorial's evaluation: the model's float32 ``out``, which for a plain model
    are its logits (log-probabilities up to that constant) and for a
    ``FlipAverage`` the log of its averaged probabilities. Images larger than
    ``tile_size`` (HRF's 3504 x 2336) go through the tiled inference of
    predict.py, so memory stays bounded and the evaluated mask is predict.py's:
    the log of the blended probabilities. With ``size`` (the label's, when the
    images were rescaled for ``--fov-diameter``) the probabilities are resized
    to it first (``probabilities_at``).
    """
    h, w = images.shape[-2:]
    tiny = torch.finfo(torch.float32).tiny
    if tile_size <= 0 or len(tile_grid(h, w, tile_size, tile_overlap, multiple)[0]) == 1:
        out = model(images)["out"].float()
        if size is None or tuple(size) == (h, w):
            return out
        return probabilities_at(out.softmax(1), size).clamp_min(tiny).log()
    probs, _ = predict_probabilities(model, images, None, None, tile_size, tile_overlap, batch_size=1,
                                     multiple=multiple, channels_last=channels_last)
    return probabilities_at(probs, size or (h, w)).clamp_min(tiny).log()  # not in place: inference-mode tensor



def predicted_classes(probs, threshold=None):
    """The class map ``[..., H, W]`` (uint8) of class probabilities ``[..., C, H, W]``: the more likely class
    (``threshold`` None; a tie is the lower class, so two classes' tie is the background), or, with a
    ``threshold``, a vessel wherever its probability 1 - P(background) exceeds it, of its most likely
    foreground class. Two classes take one byte a pixel throughout (no int64 index map): a 50-megapixel
    photograph's mask stays small."""
    background = probs.select(-3, 0)
    if probs.shape[-3] == 2:
        vessel = probs.select(-3, 1) > background if threshold is None else background < 1 - threshold
        return vessel.to(torch.uint8)
    if threshold is None:
        return probs.argmax(dim=-3).to(torch.uint8)
    foreground = probs.narrow(-3, 1, probs.shape[-3] - 1).argmax(dim=-3).add_(1)
    return torch.where(background < 1 - threshold, foreground, 0).to(torch.uint8)


def check_threshold(threshold):
    """``--threshold`` must lie strictly between 0 and 1 (None: the more likely class)."""
    if threshold is not None and not 0 < threshold < 1:
        raise UserError(f"--threshold must be between 0 and 1 (got {threshold:g})")
