"""Paired (image, target) transforms and the tutorial's train/eval presets, on torchvision.transforms.v2.

Images are ``tv_tensors.Image`` (uint8, CHW) and targets ``tv_tensors.Mask``
(uint8: 0 background, 1.. classes, 255 ignored), so every random transform
applies the same parameters to both and never blends class indices.

Every geometric transform keeps the label on its image: the resize samples
the mask with a centre-aligned nearest neighbour (as PIL's nearest, which the
tutorial uses), flips and crops move both by whole pixels, and the rotation
(``--rotate``, off in the tutorial) samples image and mask on one grid.
Photometric changes (``--color-jitter``) touch the image only.
"""
import math

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .metrics import IGNORE_INDEX
# The tutorial's DRIVE statistics and sizes, the presets' defaults, are decided with every other setting.
from .settings import BASE_SIZE, CROP_SIZE, DRIVE_MEAN, DRIVE_STD, SCALE_RANGE


class PadIfSmaller(v2.Transform):
    """Pad on the right and bottom up to ``size``: image with 0, mask with 255 (ignored).

    The tutorial pads this way before its random crop; torchvision's
    ``RandomCrop(pad_if_needed=True)`` pads both sides, which would change
    where the image can land in the crop.
    """

    def __init__(self, size, fill=0, mask_fill=IGNORE_INDEX):
        super().__init__()
        self.size = size
        self.fill = fill
        self.mask_fill = mask_fill

    def make_params(self, flat_inputs):
        h, w = v2.query_size(flat_inputs)
        return {"padw": max(self.size - w, 0), "padh": max(self.size - h, 0)}

    def transform(self, inpt, params):
        if not (params["padw"] or params["padh"]):
            return inpt
        fill = self.mask_fill if isinstance(inpt, tv_tensors.Mask) else self.fill
        return F.pad(inpt, padding=[0, 0, params["padw"], params["padh"]], fill=fill)


class RandomResize(v2.Transform):
    """Resize the shorter side to a random integer in ``[min_size, max_size]`` (both included).

    The image is resized bilinearly with antialiasing (PIL's bilinear, the
    tutorial's). The mask takes, for each output pixel, the source pixel under
    its centre (``NEAREST_EXACT``, as PIL's nearest). torchvision's own
    ``RandomResize`` gives masks the legacy ``NEAREST``, which samples the top-left
    of each source cell instead: a label then sits up to half a pixel off its
    image, on vessels 1 to 3 pixels wide.
    """

    def __init__(self, min_size, max_size):
        super().__init__()
        self.min_size = min_size
        self.max_size = max_size

    def make_params(self, flat_inputs):
        # The same draw as torchvision's RandomResize, so a seed gives the same sizes.
        return {"size": [int(torch.randint(self.min_size, self.max_size + 1, ()))]}

    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.Mask):
            # The mask kernel of older torchvision ignores the interpolation; resize it as a 1-channel image.
            out = F.resize_image(inpt.as_subclass(torch.Tensor).unsqueeze(0), params["size"],
                                 interpolation=v2.InterpolationMode.NEAREST_EXACT)
            return tv_tensors.wrap(out.squeeze(0), like=inpt)
        return F.resize(inpt, params["size"], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)


class RandomRotate(v2.Transform):
    """Rotate by an angle drawn uniformly from [-degrees, degrees] about the centre, keeping the size.

    Image and mask are sampled on the same grid (bilinear for the image, nearest for
    the mask), so the label stays on its vessel; pixels whose source lies outside
    the image become 0 in the image and 255 (ignored) in the mask.
    """

    def __init__(self, degrees, fill=0, mask_fill=IGNORE_INDEX):
        super().__init__()
        self.degrees = float(degrees)
        self.fill = fill
        self.mask_fill = mask_fill

    def make_params(self, flat_inputs):
        return {"angle": float(torch.empty(()).uniform_(-self.degrees, self.degrees))}

    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.Mask):
            return F.rotate(inpt, params["angle"], interpolation=v2.InterpolationMode.NEAREST, fill=self.mask_fill)
        return F.rotate(inpt, params["angle"], interpolation=v2.InterpolationMode.BILINEAR, fill=self.fill)


class RandomPhotometric(v2.Transform):
    """Brightness and contrast factors drawn from [1 - s, 1 + s] and a gamma from [exp(-s), exp(s)], in a random
    order of the three; the image only (the mask passes through untouched).

    Fundus photographs differ mostly in exposure and contrast between cameras
    and patients; the network should not learn DRIVE's particular ones.
    """

    def __init__(self, strength):
        super().__init__()
        self.strength = float(strength)

    def make_params(self, flat_inputs):
        s = self.strength
        u = torch.empty(3).uniform_(-s, s)
        return {"brightness": 1 + float(u[0]), "contrast": 1 + float(u[1]), "gamma": math.exp(float(u[2])),
                "order": torch.randperm(3).tolist()}

    def transform(self, inpt, params):
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        ops = [lambda x: F.adjust_brightness(x, params["brightness"]),
               lambda x: F.adjust_contrast(x, params["contrast"]),
               lambda x: F.adjust_gamma(x, params["gamma"])]
        for i in params["order"]:
            inpt = ops[i](inpt)
        return inpt


class _Preset:
    def __call__(self, img, target):
        img, target = self.transforms(tv_tensors.Image(img), tv_tensors.Mask(target))
        # Plain tensors from here on: the model and the loss need no tv_tensor dispatch.
        return img.as_subclass(torch.Tensor), target.as_subclass(torch.Tensor)


class SegmentationPresetTrain(_Preset):
    """Random resize of the shorter side to ``scale_range`` x base_size (the tutorial's [0.5, 1.2]), (rotation,)
    h/v flips, random crop, (brightness/contrast/gamma,) normalise. ``rotate`` and ``color_jitter`` are 0 (off)
    in the tutorial."""

    def __init__(self, base_size=BASE_SIZE, crop_size=CROP_SIZE, hflip_prob=0.5, vflip_prob=0.5,
                 mean=DRIVE_MEAN, std=DRIVE_STD, rotate=0.0, color_jitter=0.0, scale_range=SCALE_RANGE):
        min_size = max(1, int(scale_range[0] * base_size))  # a tiny MIN would otherwise resize to nothing
        max_size = int(scale_range[1] * base_size)
        trans = [RandomResize(min_size, max_size)]
        if rotate > 0:
            trans.append(RandomRotate(rotate))
        if hflip_prob > 0:
            trans.append(v2.RandomHorizontalFlip(hflip_prob))
        if vflip_prob > 0:
            trans.append(v2.RandomVerticalFlip(vflip_prob))
        trans += [PadIfSmaller(crop_size), v2.RandomCrop(crop_size)]
        if color_jitter > 0:  # after the crop: fewer pixels to change
            trans.append(RandomPhotometric(color_jitter))
        trans += [
            v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
            v2.Normalize(mean=mean, std=std),
        ]
        self.transforms = v2.Compose(trans)


class SegmentationPresetEval(_Preset):
    """The full image, only converted and normalised."""

    def __init__(self, mean=DRIVE_MEAN, std=DRIVE_STD):
        self.transforms = v2.Compose([
            v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
            v2.Normalize(mean=mean, std=std),
        ])


def get_transform(train, mean=DRIVE_MEAN, std=DRIVE_STD, base_size=BASE_SIZE, crop_size=CROP_SIZE, rotate=0.0,
                  color_jitter=0.0, scale_range=SCALE_RANGE):
    if train:
        return SegmentationPresetTrain(base_size, crop_size, mean=mean, std=std, rotate=rotate,
                                       color_jitter=color_jitter, scale_range=scale_range)
    return SegmentationPresetEval(mean=mean, std=std)


def scaled_size(height, width, scale):
    """(height, width) resized by ``scale``, rounded, at least 1 pixel."""
    return max(1, round(height * scale)), max(1, round(width * scale))


def rescale(img: torch.Tensor, scale: float, target: torch.Tensor = None):
    """``img`` (uint8 ``[3, H, W]``) resized by ``scale`` as the training resize does it (bilinear with
    antialiasing), and ``target`` (``[H, W]``, if given) with the centre-aligned nearest neighbour, so
    labels keep their classes and stay on their vessels. Returns (img, target)."""
    if scale == 1.0:
        return img, target
    size = list(scaled_size(*img.shape[-2:], scale))
    img = F.resize_image(img, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    if target is not None:
        target = F.resize_image(target.unsqueeze(0), size, interpolation=v2.InterpolationMode.NEAREST_EXACT)[0]
    return img, target


def normalize_image(img_uint8: torch.Tensor, mean=DRIVE_MEAN, std=DRIVE_STD) -> torch.Tensor:
    """A uint8 CHW (or NCHW) image as the model's float input, as the eval preset makes it."""
    return F.normalize(img_uint8.float().div_(255), mean=list(mean), std=list(std))
