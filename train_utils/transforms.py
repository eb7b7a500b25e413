"""Paired (image, target) transforms and the tutorial's train/eval presets, on torchvision.transforms.v2.

Images are ``tv_tensors.Image`` (uint8, CHW) and targets ``tv_tensors.Mask``
(uint8: 0 background, 1.. classes, 255 ignored), so every random transform
applies the same parameters to both and never blends class indices.

Every geometric transform keeps the label on its image: the resize samples
the mask with a centre-aligned nearest neighbour (as PIL's nearest, which the
tutorial uses), flips and crops move both by whole pixels, and the rotation
(``--rotate``, off in the tutorial) samples image and mask on one grid.
With a rotation, the preset draws resize, rotation, flips and crop as that
chain would and computes only the crop, by one map from the source
(``RandomResizeRotateCrop``, ``--crop-first``). Photometric changes
(``--color-jitter``) and sensor noise (``--noise``) touch the image only.
"""
import math

import PIL.Image
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

    def __init__(self, min_size, max_size, relative=False):
        super().__init__()
        self.min_size = min_size
        self.max_size = max_size
        self.relative = relative  # min_size and max_size are factors of each image's own shorter side

    def make_params(self, flat_inputs):
        # The same draw as torchvision's RandomResize, so a seed gives the same sizes.
        short = draw_short_side(self.min_size, self.max_size, self.relative, *v2.query_size(flat_inputs))
        return {"size": [short]}

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


def draw_short_side(lo, hi, relative, height, width):
    """A random shorter side in [lo, hi], both included: pixels, or with ``relative`` (a base size of 0)
    factors of this image's own shorter side. One draw from torch's stream either way."""
    if relative:
        short = min(height, width)
        lo, hi = max(1, int(lo * short)), max(1, int(hi * short))
    return int(torch.randint(lo, hi + 1, ()))


def resized_size(height, width, short):
    """(height, width) with the shorter side resized to ``short`` and the longer one in proportion, rounded
    down, as torchvision's resize to a single size computes it."""
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short


def affine_crop_map(height, width, rh, rw, angle, hflip, vflip, top, left):
    """The 2 x 3 matrix (float64) taking a crop pixel's centre (x, y, 1) to the source point under it.

    The chain it stands for: resize the ``height`` x ``width`` source to ``rh`` x ``rw`` (pixel centres
    aligned: x_resized = (x_source + 0.5) * rw / width - 0.5), rotate by ``angle`` degrees counter-clockwise
    about the centre ((rw - 1) / 2, (rh - 1) / 2), flip, and crop the window whose top-left pixel is
    (``left``, ``top``). Each step is undone in reverse order.
    """
    def m(a, b, c, d, e, f):
        return torch.tensor([[a, b, c], [d, e, f], [0.0, 0.0, 1.0]], dtype=torch.float64)

    window = m(1, 0, left, 0, 1, top)
    unflip = m(-1 if hflip else 1, 0, rw - 1 if hflip else 0, 0, -1 if vflip else 1, rh - 1 if vflip else 0)
    cx, cy = (rw - 1) / 2, (rh - 1) / 2
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    # torchvision's rotate: the output point (cx + u, cy + v) shows the input point
    # (cx + u cos - v sin, cy + u sin + v cos).
    unrotate = m(cos, -sin, cx - cx * cos + cy * sin, sin, cos, cy - cx * sin - cy * cos)
    sx, sy = width / rw, height / rh
    unresize = m(sx, 0, 0.5 * sx - 0.5, 0, sy, 0.5 * sy - 0.5)
    return (unresize @ unrotate @ unflip @ window)[:2]


def _source_points(matrix, size):
    """(x, y) source points (float64, ``[size, size]`` each) under the centres of a ``size`` x ``size`` window."""
    u = torch.arange(size, dtype=torch.float64)
    (a, b, c), (d, e, f) = matrix.tolist()
    return (a * u + c) + (b * u)[:, None], (d * u + f) + (e * u)[:, None]


def _footprint(matrix, size, height, width, margin):
    """The rows and columns of the source that the window reads, as slices, or None if it reads none."""
    corners = torch.tensor([[-0.5, -0.5, 1.0], [size - 0.5, -0.5, 1.0], [-0.5, size - 0.5, 1.0],
                            [size - 0.5, size - 0.5, 1.0]], dtype=torch.float64)
    pts = corners @ matrix.T
    x0, y0 = (math.floor(v) - margin for v in pts.min(0).values.tolist())
    x1, y1 = (math.ceil(v) + margin + 1 for v in pts.max(0).values.tolist())
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if x0 >= x1 or y0 >= y1:
        return None
    return slice(y0, y1), slice(x0, x1)


def sample_bilinear(img, matrix, size, n=1):
    """The ``size`` x ``size`` window of ``img`` (``[C, H, W]``) under ``matrix``, as float32 in the image's own
    range (0..255 for uint8): each pixel the mean of n x n bilinear samples spread over it, 0 where the source
    ends."""
    c, h, w = img.shape
    box = _footprint(matrix, size, h, w, margin=2)
    if box is None:
        return torch.zeros(c, size, size)
    region = img[:, box[0], box[1]].float().unsqueeze(0)
    rh, rw = region.shape[-2:]
    # grid_sample (align_corners=False) works in coordinates where -1 and 1 are the outer edges of the region:
    # from the output's such coordinates (n x n points per pixel), through the window's map, to the region's.
    from_output = torch.tensor([[size / 2, 0, size / 2 - 0.5], [0, size / 2, size / 2 - 0.5], [0, 0, 1]],
                               dtype=torch.float64)
    to_region = torch.tensor([[2 / rw, 0, (0.5 - box[1].start) * 2 / rw - 1],
                              [0, 2 / rh, (0.5 - box[0].start) * 2 / rh - 1], [0, 0, 1]], dtype=torch.float64)
    full = torch.cat((matrix, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)))
    (a, b, t0), (d, e, t1) = (to_region @ full @ from_output)[:2].tolist()
    # affine_grid's points, built by broadcasting (several times faster than its matrix product on the CPU).
    u = (torch.arange(size * n, dtype=torch.float32) + 0.5) * (2 / (size * n)) - 1
    grid = torch.stack(((a * u + t0) + (b * u)[:, None], (d * u + t1) + (e * u)[:, None]), -1).unsqueeze(0)
    out = torch.nn.functional.grid_sample(region, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    if n == 1:
        return out
    # The mean of each n x n block: n * n strided views added (a fraction of avg_pool2d's time here).
    total = sum(out[:, i::n, j::n] for i in range(n) for j in range(n))
    return total.mul_(1 / (n * n))


def sample_nearest(mask, matrix, size, fill=IGNORE_INDEX):
    """The ``size`` x ``size`` window of ``mask`` (``[..., H, W]``) under ``matrix``: each pixel the source pixel
    whose area holds its centre, ``fill`` where the source ends."""
    h, w = mask.shape[-2:]
    x, y = _source_points(matrix, size)
    xi, yi = x.add_(0.5).floor_().long(), y.add_(0.5).floor_().long()
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    flat = mask.reshape(*mask.shape[:-2], h * w)
    index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).flatten()
    out = flat[..., index].reshape(*mask.shape[:-2], size, size)
    return torch.where(inside, out, torch.full_like(out, fill))


class RandomResizeRotateCrop(v2.Transform):
    """Random resize, rotation, h/v flips and crop in one step that computes only the crop.

    The draws are ``RandomResize``, ``RandomRotate``, the two flips and the
    padded random crop's, made in their order from the same random stream, so
    a seed draws the same scale, angle, flips and window as that chain of five
    transforms (tests/test_crop_sampler.py compares the two). The window is
    then read from the source photograph by one affine map: each output pixel
    centre goes back through the crop, the flips, the rotation about the
    resized image's centre and the resize, to a point of the source.

    - The image is sampled there bilinearly. Where the resize shrinks (scale
      k < 1), each output pixel averages n x n bilinear samples spread over its
      footprint (n = ceil(1 / k)), which stands in for the resize's
      antialiasing.
    - The mask takes the source pixel under that point (nearest, no second
      rounding), so labels keep their classes and stay on their vessels.
    - Points outside the source are 0 in the image and 255 (ignored) in the
      mask, as the rotation's corners and the crop's padding are in the chain.
    - A uint8 image comes out as float32 in [0, 1] (what ``ToDtype`` would make
      of it, unrounded), so the photometric changes after it need no
      conversions either.

    Only the window's neighbourhood of the source is converted and sampled:
    the cost is the crop's, whatever the photograph's size, where the chain
    resizes and rotates the whole photograph for every crop.
    """

    def __init__(self, min_size, max_size, degrees, crop_size, hflip_prob=0.5, vflip_prob=0.5,
                 mask_fill=IGNORE_INDEX, relative=False):
        super().__init__()
        self.min_size, self.max_size, self.relative = min_size, max_size, relative
        self.degrees = float(degrees)
        self.crop_size = crop_size
        self.hflip_prob, self.vflip_prob = hflip_prob, vflip_prob
        self.mask_fill = mask_fill

    def make_params(self, flat_inputs):
        h, w = v2.query_size(flat_inputs)
        # The chain's draws, in its order, each only where the chain has that transform.
        short = draw_short_side(self.min_size, self.max_size, self.relative, h, w)
        rh, rw = resized_size(h, w, short)
        angle = float(torch.empty(()).uniform_(-self.degrees, self.degrees)) if self.degrees > 0 else 0.0
        hflip = self.hflip_prob > 0 and not bool(torch.rand(1) >= self.hflip_prob)
        vflip = self.vflip_prob > 0 and not bool(torch.rand(1) >= self.vflip_prob)
        c = self.crop_size
        top = int(torch.randint(0, rh - c + 1, ())) if rh > c else 0
        left = int(torch.randint(0, rw - c + 1, ())) if rw > c else 0
        return {"map": affine_crop_map(h, w, rh, rw, angle, hflip, vflip, top, left), "scale": min(rh / h, rw / w)}

    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.Mask):
            out = sample_nearest(inpt.as_subclass(torch.Tensor), params["map"], self.crop_size, self.mask_fill)
        else:
            img = inpt.as_subclass(torch.Tensor)
            out = sample_bilinear(img, params["map"], self.crop_size, math.ceil(1 / params["scale"] - 1e-9))
            if img.dtype == torch.uint8:  # float in [0, 1], as ToDtype(scale=True) makes it, without rounding
                out.mul_(1 / 255).clamp_(0, 1)
        return tv_tensors.wrap(out, like=inpt)


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


class RandomNoise(v2.Transform):
    """With probability ``p``, Gaussian noise of a standard deviation drawn from [0, ``sigma``] added to every
    pixel and channel of a float image in [0, 1], then clipped to it; the mask passes through untouched.

    Cameras differ in sensor noise, and a photograph's noise shrinks as it is reduced to the model's working
    scale: one whose field of view is kept near its own size reaches the network noisier than any training
    photograph did. A network that never saw noise mistakes it for texture and stops finding vessels.
    """

    def __init__(self, sigma, p=0.5):
        super().__init__()
        self.sigma, self.p = float(sigma), float(p)

    def make_params(self, flat_inputs):
        apply = bool(torch.rand(()) < self.p)
        return {"sigma": float(torch.empty(()).uniform_(0, self.sigma)) if apply else 0.0}

    def transform(self, inpt, params):
        if not isinstance(inpt, tv_tensors.Image) or params["sigma"] == 0:
            return inpt
        noisy = inpt.as_subclass(torch.Tensor) + params["sigma"] * torch.randn(inpt.shape, device=inpt.device)
        return tv_tensors.wrap(noisy.clamp_(0, 1), like=inpt)


class _Preset:
    def __call__(self, img, target):
        if isinstance(target, PIL.Image.Image):  # DriveDataset's PIL pair: the target is [H, W], as the tutorial's
            target = F.pil_to_tensor(target)[0]
        img, target = self.transforms(tv_tensors.Image(img), tv_tensors.Mask(target))
        # Plain tensors from here on: the model and the loss need no tv_tensor dispatch.
        return img.as_subclass(torch.Tensor), target.as_subclass(torch.Tensor)


class SegmentationPresetTrain(_Preset):
    """Random resize of the shorter side to ``scale_range`` x base_size (the tutorial's [0.5, 1.2]), (rotation,)
    h/v flips, random crop, (brightness/contrast/gamma, sensor noise,) normalise. ``rotate``, ``color_jitter``
    and ``noise`` are 0 (off) in the tutorial. A ``base_size`` of 0 (or None) is each image's own shorter side: photographs brought to
    their working scale (``--fov-diameter``) are varied around it, whatever their size.

    ``crop_first`` (default: when ``rotate`` > 0) draws the geometry with ``RandomResizeRotateCrop`` instead
    of the chain of whole-image transforms; ``False`` keeps the chain."""

    def __init__(self, base_size=BASE_SIZE, crop_size=CROP_SIZE, hflip_prob=0.5, vflip_prob=0.5,
                 mean=DRIVE_MEAN, std=DRIVE_STD, rotate=0.0, color_jitter=0.0, scale_range=SCALE_RANGE,
                 crop_first=None, noise=0.0):
        relative = not base_size
        if relative:
            min_size, max_size = scale_range
        else:
            min_size = max(1, int(scale_range[0] * base_size))  # a tiny MIN would otherwise resize to nothing
            max_size = int(scale_range[1] * base_size)
        # With a rotation (--rotate, --recipe fast) the geometry is sampled crop-first: the same draws, one
        # resample of the window only. Without one, the tutorial's chain runs as it is, numbers unchanged.
        if rotate > 0 if crop_first is None else crop_first:
            trans = [RandomResizeRotateCrop(min_size, max_size, rotate, crop_size, hflip_prob, vflip_prob,
                                            relative=relative)]
        else:
            trans = [RandomResize(min_size, max_size, relative)]
            if rotate > 0:
                trans.append(RandomRotate(rotate))
            if hflip_prob > 0:
                trans.append(v2.RandomHorizontalFlip(hflip_prob))
            if vflip_prob > 0:
                trans.append(v2.RandomVerticalFlip(vflip_prob))
            trans += [PadIfSmaller(crop_size), v2.RandomCrop(crop_size)]
        if color_jitter > 0:  # after the crop: fewer pixels to change
            trans.append(RandomPhotometric(color_jitter))
        trans.append(v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True))
        if noise > 0:  # on the float image: noise finer than uint8's steps
            trans.append(RandomNoise(noise))
        trans.append(v2.Normalize(mean=mean, std=std))
        self.transforms = v2.Compose(trans)


class SegmentationPresetEval(_Preset):
    """The full image, only converted and normalised."""

    def __init__(self, mean=DRIVE_MEAN, std=DRIVE_STD):
        self.transforms = v2.Compose([
            v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
            v2.Normalize(mean=mean, std=std),
        ])


def get_transform(train, mean=DRIVE_MEAN, std=DRIVE_STD, base_size=BASE_SIZE, crop_size=CROP_SIZE, rotate=0.0,
                  color_jitter=0.0, scale_range=SCALE_RANGE, crop_first=None, noise=0.0):
    if train:
        return SegmentationPresetTrain(base_size, crop_size, mean=mean, std=std, rotate=rotate,
                                       color_jitter=color_jitter, scale_range=scale_range, crop_first=crop_first,
                                       noise=noise)
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
