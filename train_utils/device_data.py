"""Batches made on the device (``--data-on-device``): the training images decoded once and kept in the device's
memory, each batch's random resize, rotation, flips and crop drawn there as one batched resample; and the
validation images, preprocessed once and kept there too (``DeviceBatches``).

The per-sample pipeline (a ``DataLoader`` over ``VesselDataset`` with the train preset) decodes nothing per
step either (the dataset caches its images), but it resizes, crops and normalises every crop on the CPU, in
worker processes, and copies it to the device. ``DeviceLoader`` does the same work where the network runs:
each sample's geometry is drawn exactly as ``transforms.RandomResizeRotateCrop`` draws it (the same random
stream, in the same order), so a seed gives the same crops as the crop-first per-sample path, and the crops
of a batch are read from the stacked sources by one ``grid_sample`` (image) and one gather (label).
"""
import itertools
import math

import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from .metrics import IGNORE_INDEX
from .transforms import RandomNoise, RandomPhotometric, RandomResizeRotateCrop


class DeviceLoader:
    """Batches of (normalised float image ``[B, 3, c, c]``, int64 target ``[B, c, c]``) on ``device``, in the
    order ``sampler`` gives the indices of ``dataset`` (a ``VesselDataset``, or a ``ConcatDataset`` of them and of
    ``RepeatDataset``s of them, each with a crop-first train preset), ``batch_size`` at a time (the last batch
    may be smaller): what a ``DataLoader`` over ``dataset`` gives, made on the device.

    Each part's preset gives its geometry (``RandomResizeRotateCrop``: its draws are used, its sampling done
    here, batched) and the photometric transforms after it (``RandomPhotometric``, ``RandomNoise``, applied
    on the device, each crop's parameters drawn in the per-sample order; the noise itself comes from the
    device's generator) and the normalisation of the first part.
    """

    def __init__(self, dataset, sampler, batch_size, device):
        self.sampler, self.batch_size, self.device = sampler, batch_size, torch.device(device)
        datasets = _vessel_datasets(dataset)
        self.parts = _parts(dataset)  # which source image each index is
        self.geometry = [geometry_of(ds.transforms) for ds in datasets]
        steps = preset_steps(datasets[0].transforms)
        self.photometric = [t for t in steps if isinstance(t, (RandomPhotometric, RandomNoise))]
        normalize = next(t for t in steps if isinstance(t, v2.Normalize))
        self.crop = self.geometry[0].crop_size
        self.mean = torch.tensor(normalize.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(normalize.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        # Every source image once, padded to the largest (image 0, label 255: what lies beyond a source); the
        # images as float32 (0..255), what grid_sample reads, so that no batch converts them again.
        pairs = [pair for ds in datasets for pair in map(ds.raw, range(len(ds)))]
        h, w = padded_size(pairs)
        self.images = torch.zeros(len(pairs), 3, h, w, dtype=torch.float32, device=self.device)
        self.targets = torch.full((len(pairs), h, w), IGNORE_INDEX, dtype=torch.uint8, device=self.device)
        self.sizes = []
        for k, (img, target) in enumerate(pairs):
            self.images[k, :, :img.shape[-2], :img.shape[-1]] = img.to(self.device)
            self.targets[k, :target.shape[-2], :target.shape[-1]] = target.to(self.device)
            self.sizes.append((img.shape[-2], img.shape[-1]))

    def __len__(self):
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        # A DataLoader draws its workers' base seed first, from the same stream: drawn here too, a seed gives
        # the per-sample path's crops.
        torch.empty((), dtype=torch.int64).random_()
        batch = []
        for index in self.sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                yield self.make_batch(batch)
                batch = []
        if batch:
            yield self.make_batch(batch)

    def source(self, index):
        """(row of ``images``, geometry) of the dataset's item ``index``."""
        for (start, visits, length, offset), geometry in zip(self.parts, self.geometry):
            if index < start + visits:
                return offset + (index - start) % length, geometry
        raise IndexError(index)

    def make_batch(self, indices):
        """The augmented batch of the dataset's items ``indices``: every draw first, in the per-sample order."""
        draws = []
        for index in indices:
            row, geometry = self.source(index)
            h, w = self.sizes[row]
            params = geometry.make_params([torch.empty(0, h, w)])
            looks = [t.make_params([]) for t in self.photometric]
            draws.append((math.ceil(1 / params["scale"] - 1e-9), row, h, w, params["map"], looks))
        # Sampled in runs of one supersampling factor (usually all alike), then put back in the drawn order.
        order = sorted(range(len(draws)), key=lambda k: draws[k][0])
        # What the batch needs from the host goes in one copy that does not wait for the GPU: each sample's map,
        # source row and size, and where it goes in the batch.
        table = torch.tensor([[*torch.as_tensor(draws[k][4]).flatten().tolist(), *draws[k][1:4], k] for k in order],
                             dtype=torch.float64).to(self.device, non_blocking=True)
        maps, rows, sizes = table[:, :6].view(-1, 2, 3), table[:, 6].long(), table[:, 7:9].long()
        image = torch.empty(len(draws), 3, self.crop, self.crop, device=self.device)
        start = 0
        for n, run in itertools.groupby(draws[k][0] for k in order):
            end = start + len(list(run))
            image[start:end] = sample_bilinear_batch(self.images.index_select(0, rows[start:end]), maps[start:end],
                                                     self.crop, n)
            start = end
        target = sample_nearest_batch(self.targets.index_select(0, rows), maps, sizes, self.crop).long()
        if order != list(range(len(order))):
            back = torch.empty_like(rows)
            back[table[:, 9].long()] = torch.arange(len(order), device=self.device)
            image, target = image.index_select(0, back), target.index_select(0, back)
        image.mul_(1 / 255).clamp_(0, 1)
        if self.photometric:
            for k, (*_, looks) in enumerate(draws):
                one = tv_tensors.Image(image[k])
                for transform, p in zip(self.photometric, looks):
                    one = transform.transform(one, p)
                image[k] = one.as_subclass(torch.Tensor)
        return image.sub_(self.mean).div_(self.std), target


class DeviceBatches:
    """A validation loader's batches from the device's copy of its images: every item this process validates
    made once by the dataset's evaluation preset (which draws nothing) and kept on ``device``, then each epoch
    batched as ``loader`` batches them, with no loader workers and no copy to the device. It keeps the
    loader's ``dataset`` and ``batch_sampler``, which validation reads for the images' names and order."""

    def __init__(self, loader, items, device):
        self.dataset, self.batch_sampler, self.collate_fn = loader.dataset, loader.batch_sampler, loader.collate_fn
        self.items = {i: tuple(t.to(device) for t in item) for i, item in items.items()}

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        for batch in self.batch_sampler:
            yield self.collate_fn([self.items[i] for i in batch])


def validation_on(loader, device, share=0.25):
    """``loader``'s ``DeviceBatches`` on ``device``, or None where its items would take more than ``share`` of
    the device's free memory (always on the CPU, where they save each epoch's preprocessing)."""
    items = {i: loader.dataset[i] for batch in loader.batch_sampler for i in batch}
    device = torch.device(device)
    if device.type == "cuda":
        need = sum(t.numel() * t.element_size() for item in items.values() for t in item)
        if need > share * torch.cuda.mem_get_info(device)[0]:
            return None
    return DeviceBatches(loader, items, device)


def _unrepeated(part):
    """(dataset, times): a ``RepeatDataset`` (a dataset seen ``times`` times an epoch) taken apart."""
    return (part.dataset, part.times) if hasattr(part, "times") else (part, 1)


def _vessel_datasets(dataset):
    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    return [_unrepeated(part)[0] for part in parts]


def _parts(dataset):
    """[(first index, indices spanned, images, first row)] of each part of a ``VesselDataset`` or a
    ``ConcatDataset`` of them and of ``RepeatDataset``s of them: which dataset item an index is."""
    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    out, start, offset = [], 0, 0
    for part in parts:
        part, times = _unrepeated(part)
        out.append((start, len(part) * times, len(part), offset))
        start += len(part) * times
        offset += len(part)
    return out


def _maps_on(maps, device):
    """The window maps (a ``[B, 2, 3]`` tensor, or a list of 2 x 3 arrays) as float64 on ``device``."""
    if isinstance(maps, torch.Tensor):
        return maps.to(device, torch.float64)
    return torch.stack([torch.as_tensor(t, dtype=torch.float64) for t in maps]).to(device)


def _grid(maps, size, n, height, width, device):
    """``grid_sample``'s grid ``[B, size * n, size * n, 2]`` of the window maps ``maps`` (2 x 3, crop pixel centre
    to source point) over sources ``height`` x ``width``: n x n points spread over each crop pixel."""
    m = _maps_on(maps, device)
    u = (torch.arange(size * n, dtype=torch.float64, device=device) + 0.5) / n - 0.5  # crop pixel coordinates
    x = m[:, 0, 0, None, None] * u + m[:, 0, 1, None, None] * u[:, None] + m[:, 0, 2, None, None]
    y = m[:, 1, 0, None, None] * u + m[:, 1, 1, None, None] * u[:, None] + m[:, 1, 2, None, None]
    # grid_sample (align_corners=False): -1 and 1 are the outer edges of the first and last source pixels.
    grid = torch.stack(((x + 0.5) * (2 / width) - 1, (y + 0.5) * (2 / height) - 1), -1)
    return grid.float()


def sample_bilinear_batch(images, maps, size, n=1):
    """The ``size`` x ``size`` windows of ``images`` (``[B, C, H, W]``, 0..255) under ``maps`` (``_maps_on``), float32:
    each pixel the mean of n x n bilinear samples spread over it, 0 beyond the source (as
    ``transforms.sample_bilinear`` reads one window)."""
    b, c, h, w = images.shape
    grid = _grid(maps, size, n, h, w, images.device)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if n == 1:
        return out
    return out.view(b, c, size, n, size, n).mean(dim=(3, 5))


def sample_nearest_batch(targets, maps, sizes, size, fill=IGNORE_INDEX):
    """The ``size`` x ``size`` windows of ``targets`` (``[B, H, W]``) under ``maps``: each pixel the source pixel
    whose area holds its centre (as ``transforms.sample_nearest``), ``fill`` beyond each source's own size
    (``sizes``: height and width of each, ``[B, 2]`` or a list of pairs)."""
    b, h, w = targets.shape
    m = _maps_on(maps, targets.device)
    u = torch.arange(size, dtype=torch.float64, device=targets.device)
    x = (m[:, 0, 0, None, None] * u + m[:, 0, 2, None, None]) + m[:, 0, 1, None, None] * u[:, None]
    y = (m[:, 1, 0, None, None] * u + m[:, 1, 2, None, None]) + m[:, 1, 1, None, None] * u[:, None]
    x, y = x.add_(0.5).floor_().long(), y.add_(0.5).floor_().long()
    limits = torch.as_tensor(sizes, device=targets.device)
    inside = (x >= 0) & (x < limits[:, 1, None, None]) & (y >= 0) & (y < limits[:, 0, None, None])
    index = (y.clamp(0, h - 1) * w + x.clamp(0, w - 1)).view(b, -1)
    out = targets.reshape(b, -1).gather(1, index).view(b, size, size)
    return torch.where(inside, out, torch.full_like(out, fill))


def padded_size(pairs):
    """(height, width) that holds every image of ``pairs``."""
    return max(img.shape[-2] for img, _ in pairs), max(img.shape[-1] for img, _ in pairs)


def fits_on(dataset, device, share=0.5):
    """Whether ``DeviceLoader``'s copy of ``dataset``'s images (13 bytes a pixel: float32 RGB and a uint8 label,
    padded to the largest) takes at most ``share`` of the device's free memory; always on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    datasets = _vessel_datasets(dataset)
    h, w = padded_size([ds.raw(i) for ds in datasets for i in range(len(ds))])
    need = 13 * h * w * sum(len(ds) for ds in datasets)
    return need <= share * torch.cuda.mem_get_info(device)[0]


def preset_steps(preset):
    """The transforms of a train preset (``transforms.SegmentationPresetTrain``), in order."""
    return preset.transforms.transforms  # the preset's v2.Compose, and its list


def geometry_of(preset):
    """The ``RandomResizeRotateCrop`` of a crop-first train preset."""
    found = [t for t in preset_steps(preset) if isinstance(t, RandomResizeRotateCrop)]
    if not found:
        raise ValueError("the device path samples crop-first: build the preset with crop_first=True")
    return found[0]
