"""The vessel datasets: a reader per file layout, their registry ``DATASETS``, and the (image, target) datasets.

Each dataset is read from the folder its archive unpacks to (``ROOT`` is what
``--data-path`` names); ``--dataset`` picks the layout::

    drive      ROOT/DRIVE/{training,test}/images/NN_{training,test}.tif
               ROOT/DRIVE/{training,test}/1st_manual/NN_manual1.gif
               ROOT/DRIVE/{training,test}/mask/NN_{training,test}_mask.gif
    chase_db1  ROOT/Image_NNX.jpg, ROOT/Image_NNX_1stHO.png (X = L/R; no FOV masks)
               images 01-10 train, 11-14 test
    stare      ROOT/stare-images/imNNNN.ppm[.gz], ROOT/labels-ah/imNNNN.ah.ppm[.gz] (no FOV masks)
               the first 10 labelled images train, the others test
    hrf        ROOT/images/NN_{h,dr,g}.jpg, ROOT/manual1/NN_{h,dr,g}.tif, ROOT/mask/NN_{h,dr,g}_mask.tif
               01-05 of each category train, 06-15 test
    folder     ROOT/{training,test}/images/*, ROOT/{training,test}/labels/* and optionally .../masks/*,
               matched by file stem; any format Pillow reads, gzip-compressed (.gz) too

Artery/vein datasets (their labels: class indices 0 background, 1 artery, 2 vein, 3 uncertain, or the
colours red artery, blue vein, green crossing, white uncertain; uncertain vessels are ignored)::

    drive_av   DRIVE's layout with ROOT/DRIVE/{training,test}/av/NN_{training,test}.png (RITE's labels)
    hrf_av     HRF's layout with ROOT/av/NN_{h,dr,g}.png (any image format); 01-05 train, 06-15 test

Without FOV masks the field of view is estimated from the photograph's dark
border (``fov="estimate"``, as predict.py does) or every pixel counts (``fov="all"``).
Adding a dataset takes a reader function and its entry in ``DATASETS``.

``VesselDataset`` is what train.py uses (every file decoded once, uint8
tensors, the transforms of train_utils/transforms.py); ``DriveDataset`` is the
tutorial's (PIL images, decoded per item). Decoding and the label and mask
rules are in train_utils/imaging.py.

Run as a script, it writes synthetic data in any of these layouts (train_utils/synthetic.py)::

    python my_dataset.py --output-dir data/synthetic          # DRIVE format: data/synthetic/DRIVE
    python my_dataset.py --dataset stare --output-dir data/stare --num-train 10 --num-test 5
"""
import os
import re
import sys
from typing import Callable, NamedTuple, Optional

if __name__ == "__main__":  # the synthetic-data writer: its flags are checked before torch loads
    from train_utils.cli import synthetic_main
    sys.exit(synthetic_main(doc=__doc__))

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from train_utils.errors import UserError
from train_utils.imaging import files_by_stem, fov_scale, is_image_name, list_files, load_sample, stem_of
from train_utils.metrics import IGNORE_INDEX
from train_utils.transforms import BASE_SIZE, DRIVE_MEAN, DRIVE_STD, rescale

# Standard splits of the datasets that ship without one.
CHASE_TRAIN_LAST = 10  # Image_01..10 (both eyes) train, 11..14 test
STARE_TRAIN_COUNT = 10  # the first 10 labelled images train
HRF_TRAIN_LAST = 5  # 01..05 of each category train, 06..15 test


class Sample(NamedTuple):
    """The files of one image: photograph, label, FOV mask (None: the dataset has none)."""
    image: str
    label: str
    mask: Optional[str]


# ---------------------------------------------------------------------------
# dataset layouts: each returns the sorted samples of one split ("training" or "test")


def _require_dir(path, what):
    if not os.path.isdir(path):
        raise UserError(f"folder '{path}' does not exist ({what})")
    return path


def _need(path, kind, image):
    if not os.path.isfile(path):
        raise UserError(f"{kind} file '{path}' for image '{image}' does not exist")
    return path


def drive_files(root, split):
    """Sorted (image, manual label, FOV mask) paths of one split; a clear error for anything missing."""
    data_root = os.path.join(root, "DRIVE", split)
    if not os.path.isdir(os.path.join(root, "DRIVE")):
        raise UserError(f"path '{os.path.join(root, 'DRIVE')}' does not exist: --data-path must name the folder "
                        "that holds DRIVE/")
    if not os.path.isdir(data_root):
        return []  # a DRIVE root with one split only: the caller says whether that split is needed
    img_dir = os.path.join(data_root, "images")
    if not os.path.isdir(img_dir):
        raise UserError(f"folder '{img_dir}' does not exist")
    names = [n for n in list_files(img_dir) if n.lower().endswith((".tif", ".tiff"))]
    if not names:
        raise UserError(f"no .tif images in '{img_dir}'")
    files = []
    for name in names:
        number = name.split("_")[0]
        manual = _need(os.path.join(data_root, "1st_manual", f"{number}_manual1.gif"), "label", name)
        mask = _need(os.path.join(data_root, "mask", f"{number}_{split}_mask.gif"), "FOV mask", name)
        files.append(Sample(os.path.join(img_dir, name), manual, mask))
    return files


def chase_db1_files(root, split):
    """CHASE_DB1 as its archive unpacks: one flat folder; the label is the first observer's (1stHO)."""
    pattern = re.compile(r"^Image_(\d+)([LR])\.jpg$", re.IGNORECASE)
    folder = _require_dir(root, "--data-path for chase_db1: the folder holding Image_NNX.jpg")
    names = [n for n in list_files(folder) if pattern.match(n)]
    if not names:
        raise UserError(f"no CHASE_DB1 photographs (Image_NNX.jpg) in '{folder}'")
    train = split == "training"
    files = []
    for name in names:
        if (int(pattern.match(name).group(1)) <= CHASE_TRAIN_LAST) != train:
            continue
        label = _need(os.path.join(folder, stem_of(name) + "_1stHO.png"), "label", name)
        files.append(Sample(os.path.join(folder, name), label, None))
    return files


def stare_files(root, split):
    """STARE as its archives unpack: photographs and Hoover's labels (labels-ah), possibly gzip-compressed."""
    img_dir = _require_dir(os.path.join(root, "stare-images"), "STARE's photographs")
    label_dir = _require_dir(os.path.join(root, "labels-ah"), "STARE's labels by A. Hoover")
    pattern = re.compile(r"^(im\d+)\.ppm(\.gz)?$", re.IGNORECASE)
    labelled, unlabelled = [], []
    label_names = files_by_stem(label_dir)
    for name in list_files(img_dir):
        m = pattern.match(name)
        if not m:
            continue
        label = label_names.get(m.group(1) + ".ah")
        if label is None:
            unlabelled.append(name)
        else:
            labelled.append(Sample(os.path.join(img_dir, name), os.path.join(label_dir, label[0]), None))
    if not labelled:
        raise UserError(f"no labelled STARE photographs (imNNNN.ppm with labels-ah/imNNNN.ah.ppm) in '{root}'")
    if unlabelled and split == "training":
        print(f"note: {len(unlabelled)} STARE photograph{'s' * (len(unlabelled) > 1)} without a vessel label "
              f"skipped ({unlabelled[0]}{', ...' if len(unlabelled) > 1 else ''})")
    return labelled[:STARE_TRAIN_COUNT] if split == "training" else labelled[STARE_TRAIN_COUNT:]


def hrf_files(root, split, need_labels=True):
    """HRF as its archive unpacks: images/, manual1/ and mask/ (healthy, diabetic retinopathy, glaucoma).
    ``need_labels=False``: the vessel labels are not read (label None), as for ``hrf_av``."""
    img_dir = _require_dir(os.path.join(root, "images"), "HRF's photographs")
    pattern = re.compile(r"^(\d+)_(h|dr|g)\.jpe?g$", re.IGNORECASE)
    names = [n for n in list_files(img_dir) if pattern.match(n)]
    if not names:
        raise UserError(f"no HRF photographs (NN_h.jpg, NN_dr.jpg, NN_g.jpg) in '{img_dir}'")
    train = split == "training"
    label_dir, mask_dir = os.path.join(root, "manual1"), os.path.join(root, "mask")
    labels, masks = files_by_stem(label_dir) if need_labels else {}, files_by_stem(mask_dir)
    files = []
    for name in names:
        number, kind = pattern.match(name).groups()
        if (int(number) <= HRF_TRAIN_LAST) != train:
            continue
        stem = f"{number}_{kind.lower()}"
        label = _need(os.path.join(label_dir, labels.get(stem, [stem + ".tif"])[0]), "label", name) \
            if need_labels else None
        mask = _need(os.path.join(mask_dir, masks.get(stem + "_mask", [stem + "_mask.tif"])[0]), "FOV mask", name)
        files.append(Sample(os.path.join(img_dir, name), label, mask))
    return files


def folder_files(root, split):
    """Any dataset laid out as ROOT/{training,test}/{images,labels[,masks]}/, files matched by stem.

    A mask may be named as its image or ``<stem>_mask``.
    """
    base = _require_dir(os.path.join(root, split), f"the {split} split of a folder dataset")
    img_dir = _require_dir(os.path.join(base, "images"), "photographs")
    label_dir = _require_dir(os.path.join(base, "labels"), "labels")
    mask_dir = os.path.join(base, "masks")
    labels = files_by_stem(label_dir)
    masks = files_by_stem(mask_dir) if os.path.isdir(mask_dir) else None
    files = []
    for name in (n for n in list_files(img_dir) if is_image_name(n)):
        stem = stem_of(name)
        if stem not in labels:
            raise UserError(f"no label for image '{os.path.join(img_dir, name)}' in '{label_dir}' "
                            f"(looked for {stem}.*)")
        mask = None
        if masks is not None:
            found = masks.get(stem) or masks.get(stem + "_mask")
            if found is None:
                raise UserError(f"no FOV mask for image '{name}' in '{mask_dir}' (looked for {stem}.* and "
                                f"{stem}_mask.*); remove masks/ to estimate every image's FOV")
            mask = os.path.join(mask_dir, found[0])
        files.append(Sample(os.path.join(img_dir, name), os.path.join(label_dir, labels[stem][0]), mask))
    return files


def drive_av_files(root, split):
    """DRIVE's photographs and FOV masks with the artery/vein labels of RITE in ``av/`` beside them."""
    samples = drive_files(root, split)
    av_dir = os.path.join(root, "DRIVE", split, "av")
    if samples and not os.path.isdir(av_dir):
        raise UserError(f"folder '{av_dir}' does not exist (the artery/vein labels of DRIVE's {split} images)")
    labels = files_by_stem(av_dir) if samples else {}
    files = []
    for s in samples:
        stem = stem_of(s.image)
        if stem not in labels:
            raise UserError(f"artery/vein label file '{os.path.join(av_dir, stem + '.png')}' for image "
                            f"'{os.path.basename(s.image)}' does not exist")
        files.append(s._replace(label=os.path.join(av_dir, labels[stem][0])))
    return files


def hrf_av_files(root, split):
    """HRF's photographs and FOV masks with artery/vein labels in ``av/``, named as the photographs."""
    av_dir = _require_dir(os.path.join(root, "av"), "HRF's artery/vein labels")
    labels = files_by_stem(av_dir)
    files = []
    for s in hrf_files(root, split, need_labels=False):
        stem = stem_of(s.image).lower()
        found = labels.get(stem) or labels.get(stem_of(s.image))
        if found is None:
            raise UserError(f"artery/vein label file '{os.path.join(av_dir, stem + '.png')}' for image "
                            f"'{os.path.basename(s.image)}' does not exist")
        files.append(s._replace(label=os.path.join(av_dir, found[0])))
    return files


# ---------------------------------------------------------------------------
# the registry


class DatasetSpec(NamedTuple):
    """A dataset: how to list its files, and the defaults train.py takes for it."""
    reader: Callable  # (root, split) -> the split's samples, sorted
    mean: tuple  # training-split statistics inside the FOV (compute_mean_std.py), in [0, 1]
    std: tuple
    base_size: Optional[int]  # the random resize's base (None: the median shorter side of the training images)
    fov_masks: Optional[bool]  # True: every image has a FOV mask file; False: none (estimated); None: optional
    av: bool = False  # artery/vein labels (imaging.read_av_label): a model of 2 classes besides the background


# The statistics by compute_mean_std.py --dataset: CHASE_DB1 images 01-10, STARE's first 10 labelled images.
# HRF and folders take DRIVE's (the tutorial's).
DATASETS = {
    "drive": DatasetSpec(drive_files, DRIVE_MEAN, DRIVE_STD, BASE_SIZE, True),
    "chase_db1": DatasetSpec(chase_db1_files, (0.6413, 0.2336, 0.0404), (0.2314, 0.1091, 0.0386), None, False),
    "stare": DatasetSpec(stare_files, (0.7421, 0.4000, 0.1208), (0.2221, 0.1408, 0.1224), None, False),
    "hrf": DatasetSpec(hrf_files, DRIVE_MEAN, DRIVE_STD, None, True),
    "folder": DatasetSpec(folder_files, DRIVE_MEAN, DRIVE_STD, None, None),
    "drive_av": DatasetSpec(drive_av_files, DRIVE_MEAN, DRIVE_STD, BASE_SIZE, True, av=True),
    "hrf_av": DatasetSpec(hrf_av_files, DRIVE_MEAN, DRIVE_STD, None, True, av=True),
}


def dataset_files(name, root, split):
    """The samples of ``split`` ("training" or "test") of dataset ``name`` under ``root``; may be empty."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}' (choose from {', '.join(DATASETS)})")
    return DATASETS[name].reader(root, split)


def holdout(num_images, count, seed=0):
    """Indices of ``count`` of ``num_images`` training images held out for validation: a seeded, sorted choice."""
    if not 0 < count < num_images:
        raise UserError(f"--val-split {count} must hold out at least 1 and fewer than the {num_images} training "
                        "images")
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(num_images, size=count, replace=False).tolist())


# ---------------------------------------------------------------------------
# datasets


def cat_list(tensors, fill_value=0):
    """Stack tensors of different sizes, padding each on the right/bottom to the largest with ``fill_value``."""
    if all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(tensors)
    max_size = tuple(max(s) for s in zip(*[t.shape for t in tensors]))
    batched = tensors[0].new_full((len(tensors),) + max_size, fill_value)
    for t, pad_t in zip(tensors, batched):
        pad_t[tuple(slice(0, s) for s in t.shape)].copy_(t)
    return batched


class VesselDataset(Dataset):
    """(image, target) pairs of a list of ``Sample``; target is the label's classes inside the FOV, 255 outside.

    With ``cache=True`` (the default) every file is decoded once, when the
    dataset is built: these datasets are small (tens of images), decoding a
    TIFF or JPEG costs more than the whole augmentation, the FOV of a mask-less
    photograph is estimated once, and a broken file is reported before
    training starts. Augmentation still runs per sample.


    With ``fov_diameter`` D (``--fov-diameter``), every photograph is resized
    so that its FOV is D pixels across (``imaging.fov_diameter``), the scale
    the model sees whatever the camera; with ``fov_diameter_max`` too, a
    photograph between the two keeps its own scale
    (``imaging.working_diameter``). For training the target is resized with it;
    validation (``resize_target=False``) keeps the label at the photograph's own
    size, where the prediction is scored after it is resized back.
    """

    def __init__(self, samples, transforms=None, cache=True, num_classes=1, fov="estimate", fov_diameter=0,
                 resize_target=True, fov_diameter_max=0, av=False, vessel_any=False):
        super().__init__()
        self.samples = list(samples)
        self.img_list = [s.image for s in self.samples]
        self.manual = [s.label for s in self.samples]
        self.roi_mask = [s.mask for s in self.samples]
        self.num_classes = num_classes
        if av and num_classes != 2:
            raise UserError(f"artery/vein labels need --num-classes 2 (artery, vein), not {num_classes}")
        self.av, self.vessel_any = av, vessel_any  # vessel_any: vessel labels for an artery/vein model
        self.fov = fov
        self.fov_diameter, self.fov_diameter_max = fov_diameter, fov_diameter_max
        self.resize_target = resize_target
        self.transforms = transforms
        self._cache = [self._load(i) for i in range(len(self.samples))] if cache else None

    def _load(self, idx):
        """(image uint8 [3, H, W], target uint8 [H, W]) of sample ``idx``, rescaled for ``fov_diameter``."""
        s = self.samples[idx]
        img, target = load_sample(s.image, s.label, s.mask, self.num_classes, self.fov, self.av, self.vessel_any)
        img, target = torch.from_numpy(img).permute(2, 0, 1).contiguous(), torch.from_numpy(target)
        if self.fov_diameter:
            scale = fov_scale(target.numpy() != IGNORE_INDEX, self.fov_diameter, self.fov_diameter_max)
            img, resized = rescale(img, scale, target if self.resize_target else None)
            target = resized if self.resize_target else target
        return img, target

    def __len__(self):
        return len(self.samples)

    def raw(self, idx):
        """(image uint8 [3, H, W], target uint8 [H, W]) of item ``idx`` before its transforms."""
        return self._cache[idx] if self._cache is not None else self._load(idx)

    def __getitem__(self, idx):
        img, target = self.raw(idx)
        if self.transforms is not None:
            img, target = self.transforms(img, target)
        return img, target

    @staticmethod
    def collate_fn(batch):
        """Pad a batch to its largest image: images with 0, targets with 255 (ignored), as the tutorial does."""
        images, targets = list(zip(*batch))
        return cat_list(images, fill_value=0), cat_list(targets, fill_value=IGNORE_INDEX)


class DriveDataset(Dataset):
    """The tutorial's DRIVE dataset: the training split (``train=True``) or the test split.

    An item is ``transforms(img, target)``, or that pair itself without
    transforms: ``img`` a PIL RGB image, ``target`` a PIL 'L' image holding 1
    for vessel and 0 for background inside the FOV and 255 outside, the values
    of ``VesselDataset``'s target, so the tutorial's PIL transforms run on it.
    Files are decoded per item; train.py uses ``VesselDataset``.
    """

    def __init__(self, root: str, train: bool, transforms=None):
        super().__init__()
        self.flag = "training" if train else "test"
        samples = drive_files(root, self.flag)
        if not samples:
            raise UserError(f"path '{os.path.join(root, 'DRIVE', self.flag)}' does not exist")
        self.transforms = transforms
        self.img_list = [s.image for s in samples]
        self.manual = [s.label for s in samples]
        self.roi_mask = [s.mask for s in samples]

    def __getitem__(self, idx):
        img, target = load_sample(self.img_list[idx], self.manual[idx], self.roi_mask[idx])
        img, target = Image.fromarray(img), Image.fromarray(target)
        if self.transforms is not None:
            img, target = self.transforms(img, target)
        return img, target

    def __len__(self):
        return len(self.img_list)

    collate_fn = staticmethod(VesselDataset.collate_fn)


class RepeatDataset(Dataset):
    """``dataset`` seen ``times`` times per epoch (index i is item i % len): each visit draws its own random
    crop, so an epoch of small crops still covers every image several times. Works under any sampler."""

    def __init__(self, dataset, times):
        self.dataset = dataset
        self.times = times

    def __len__(self):
        return len(self.dataset) * self.times

    def __getitem__(self, index):
        return self.dataset[index % len(self.dataset)]

    def __getattr__(self, name):  # collate_fn, images, ...: the wrapped dataset's
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)



class SameSizeBatchSampler(Sampler):
    """Batches of up to ``batch_size`` indices of ``sampler``, in its order, each batch of images of one size
    (``sizes``: a key per index, e.g. the image's and the label's shapes): validation's batches, which the
    padding of differently sized images would change. A size's last batch may be smaller."""

    def __init__(self, sampler, sizes, batch_size):
        self.sampler, self.sizes, self.batch_size = sampler, sizes, batch_size

    def __iter__(self):
        open_batches = {}
        for index in self.sampler:
            batch = open_batches.setdefault(self.sizes[index], [])
            batch.append(index)
            if len(batch) == self.batch_size:
                yield open_batches.pop(self.sizes[index])
        yield from open_batches.values()

    def __len__(self):
        counts = {}
        for index in self.sampler:
            counts[self.sizes[index]] = counts.get(self.sizes[index], 0) + 1
        return sum(-(-n // self.batch_size) for n in counts.values())


class BalancedSampler(Sampler):
    """Indices into a ``ConcatDataset`` of several datasets, each drawn equally often.

    An epoch has as many samples as all the datasets together, an equal share
    from each: a dataset of 6 images then counts as much as one of 20. Each
    dataset's share runs through random permutations of its items, so within
    an epoch no item repeats before all of its dataset's have come. The order
    depends on ``seed`` and the epoch (``set_epoch``), the same on every process;
    under DDP each of ``world_size`` processes takes every ``world_size``-th index.
    """

    def __init__(self, sizes, seed=None, rank=0, world_size=1):
        self.sizes = list(sizes)
        self.seed = int(torch.randint(2 ** 31, ())) if seed is None else seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return sum(self.sizes) // self.world_size

    def shares(self):
        """How many samples each dataset gives an epoch: equal, the remainder to the first ones."""
        total, n = sum(self.sizes), len(self.sizes)
        return [total // n + (i < total % n) for i in range(n)]

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed * 100003 + self.epoch)
        drawn, offset = [], 0
        for size, share in zip(self.sizes, self.shares()):
            laps = -(-share // size)
            drawn.append(torch.cat([torch.randperm(size, generator=g) for _ in range(laps)])[:share] + offset)
            offset += size
        order = torch.cat(drawn)[torch.randperm(sum(self.sizes), generator=g)]
        return iter(order[self.rank:len(self) * self.world_size:self.world_size].tolist())
