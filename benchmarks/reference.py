"""The tutorial's training run, written after the tutorial, as the baseline (a) of ``benchmark.py``.

    python benchmarks/reference.py --data-path ROOT --epochs 3 --output-dir /tmp/ref

Nothing here is used by the project: it runs training the way the tutorial's
``train.py`` does, so the benchmark can time it as a user would run it:

- a DataLoader with the tutorial's min(cpus, batch, 8) worker processes,
  shuffling and ``pin_memory=True``, and glibc's malloc (the benchmark starts it
  with no allocator preloaded);

- the dice loss loops in Python over images and classes, drops ignored pixels
  with boolean indexing and asks ``if sets_sum == 0`` (a host sync) each time;
- ``build_target`` writes the ignore value with boolean-mask assignment;
- every sample is decoded from disk with PIL and augmented as a PIL image
  (resize / flip / pad / crop), then ``to_tensor`` and ``normalize``;
  the target is the tutorial's ``manual / 255 + (255 - mask)`` clipped to
  [0, 255], kept as a float ("F" mode) PIL image until ``ToTensor``;
- ``ConfusionMatrix.update`` uses a boolean mask and ``bincount``;
  ``DiceCoefficient.update`` adds the batch's multiclass dice (one value per
  batch, so per image at the validation batch size of 1);
- the model runs in NCHW float32 (no channels_last, no autocast).
"""
import argparse
import datetime
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.unet import UNet  # noqa: E402  (the same model: the tutorial's U-Net, base_c 32)
from train_utils import distributed_utils as utils  # noqa: E402  (overridden where the tutorial differs)
from train_utils.train_and_eval import create_lr_scheduler  # noqa: E402  (the same schedule)

DRIVE_MEAN = (0.709, 0.381, 0.224)
DRIVE_STD = (0.127, 0.079, 0.043)


# ---------------------------------------------------------------------------
# loss: the per-image, per-class loop


def build_target(target, num_classes=2, ignore_index=-100):
    """One-hot [N, C, H, W] float target; ignored pixels carry ``ignore_index`` in every channel."""
    dice_target = target.clone()
    if ignore_index >= 0:
        ignore_mask = torch.eq(target, ignore_index)
        dice_target[ignore_mask] = 0
        dice_target = F.one_hot(dice_target, num_classes).float()
        dice_target[ignore_mask] = ignore_index
    else:
        dice_target = F.one_hot(dice_target, num_classes).float()
    return dice_target.permute(0, 3, 1, 2)


def dice_coeff(x, target, ignore_index=-100, epsilon=1e-6):
    """Mean over the batch of each image's dice; one boolean index and one host sync per image."""
    d = 0.0
    batch_size = x.shape[0]
    for i in range(batch_size):
        x_i = x[i].reshape(-1)
        t_i = target[i].reshape(-1)
        if ignore_index >= 0:
            roi_mask = torch.ne(t_i, ignore_index)
            x_i = x_i[roi_mask]
            t_i = t_i[roi_mask]
        inter = torch.dot(x_i, t_i)
        sets_sum = torch.sum(x_i) + torch.sum(t_i)
        if sets_sum == 0:  # the host sync the project removed
            sets_sum = 2 * inter
        d += (2 * inter + epsilon) / (sets_sum + epsilon)
    return d / batch_size


def multiclass_dice_coeff(x, target, ignore_index=-100, epsilon=1e-6):
    dice = 0.0
    for channel in range(x.shape[1]):
        dice += dice_coeff(x[:, channel, ...], target[:, channel, ...], ignore_index, epsilon)
    return dice / x.shape[1]


def dice_loss(x, target, multiclass=False, ignore_index=-100):
    x = F.softmax(x, dim=1)
    fn = multiclass_dice_coeff if multiclass else dice_coeff
    return 1 - fn(x, target, ignore_index=ignore_index)


def criterion(inputs, target, loss_weight=None, num_classes=2, dice=True, ignore_index=-100):
    losses = {}
    for name, x in inputs.items():
        loss = F.cross_entropy(x, target, ignore_index=ignore_index, weight=loss_weight)
        if dice is True:
            dice_target = build_target(target, num_classes, ignore_index)
            loss += dice_loss(x, dice_target, multiclass=True, ignore_index=ignore_index)
        losses[name] = loss
    if len(losses) == 1:
        return losses["out"]
    return losses["out"] + 0.5 * losses["aux"]


# ---------------------------------------------------------------------------
# PIL transforms, one sample at a time


def pad_if_smaller(img, size, fill=0):
    min_size = min(img.size)
    if min_size < size:
        ow, oh = img.size
        padh = size - oh if oh < size else 0
        padw = size - ow if ow < size else 0
        img = TF.pad(img, (0, 0, padw, padh), fill=fill)
    return img


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


class RandomResize:
    def __init__(self, min_size, max_size=None):
        self.min_size = min_size
        self.max_size = min_size if max_size is None else max_size

    def __call__(self, image, target):
        size = random.randint(self.min_size, self.max_size)
        image = TF.resize(image, size)
        target = TF.resize(target, size, interpolation=T.InterpolationMode.NEAREST)
        return image, target


class RandomFlip:
    """The tutorial's RandomHorizontalFlip / RandomVerticalFlip, one class for both (``flip`` is TF.hflip or TF.vflip)."""

    def __init__(self, flip_prob, flip):
        self.flip_prob = flip_prob
        self.flip = flip

    def __call__(self, image, target):
        if random.random() < self.flip_prob:
            image = self.flip(image)
            target = self.flip(target)
        return image, target


class RandomCrop:
    def __init__(self, size):
        self.size = size

    def __call__(self, image, target):
        image = pad_if_smaller(image, self.size)
        target = pad_if_smaller(target, self.size, fill=255)
        crop_params = T.RandomCrop.get_params(image, (self.size, self.size))
        image = TF.crop(image, *crop_params)
        target = TF.crop(target, *crop_params)
        return image, target


class ToTensor:
    def __call__(self, image, target):
        image = TF.to_tensor(image)
        target = torch.as_tensor(np.array(target), dtype=torch.int64)
        return image, target


class Normalize:
    def __init__(self, mean, std):
        self.mean = mean
        self.std = std

    def __call__(self, image, target):
        return TF.normalize(image, mean=self.mean, std=self.std), target


class SegmentationPresetTrain:
    def __init__(self, base_size=565, crop_size=480, hflip_prob=0.5, vflip_prob=0.5,
                 mean=DRIVE_MEAN, std=DRIVE_STD):
        min_size = int(0.5 * base_size)
        max_size = int(1.2 * base_size)
        trans = [RandomResize(min_size, max_size)]
        if hflip_prob > 0:
            trans.append(RandomFlip(hflip_prob, TF.hflip))
        if vflip_prob > 0:
            trans.append(RandomFlip(vflip_prob, TF.vflip))
        trans += [RandomCrop(crop_size), ToTensor(), Normalize(mean=mean, std=std)]
        self.transforms = Compose(trans)

    def __call__(self, img, target):
        return self.transforms(img, target)


class SegmentationPresetEval:
    def __init__(self, mean=DRIVE_MEAN, std=DRIVE_STD):
        self.transforms = Compose([ToTensor(), Normalize(mean=mean, std=std)])

    def __call__(self, img, target):
        return self.transforms(img, target)


def get_transform(train, mean=DRIVE_MEAN, std=DRIVE_STD, base_size=565, crop_size=480):
    if train:
        return SegmentationPresetTrain(base_size, crop_size, mean=mean, std=std)
    return SegmentationPresetEval(mean=mean, std=std)


# ---------------------------------------------------------------------------
# dataset: decode from disk with PIL on every access


class DriveDataset(Dataset):
    def __init__(self, root, train, transforms=None):
        self.flag = "training" if train else "test"
        data_root = os.path.join(root, "DRIVE", self.flag)
        img_names = sorted(i for i in os.listdir(os.path.join(data_root, "images")) if i.endswith(".tif"))
        self.img_list = [os.path.join(data_root, "images", i) for i in img_names]
        self.manual = [os.path.join(data_root, "1st_manual", i.split("_")[0] + "_manual1.gif") for i in img_names]
        self.roi_mask = [os.path.join(data_root, "mask", f"{i.split('_')[0]}_{self.flag}_mask.gif")
                         for i in img_names]
        self.transforms = transforms

    def __len__(self):
        return len(self.img_list)

    def __getitem__(self, idx):
        img = Image.open(self.img_list[idx]).convert("RGB")
        manual = np.array(Image.open(self.manual[idx]).convert("L")) / 255
        roi_mask = 255 - np.array(Image.open(self.roi_mask[idx]).convert("L"))
        # vessel 1, background 0, outside the FOV 255; a float64 array, so an "F" mode image
        mask = Image.fromarray(np.clip(manual + roi_mask, a_min=0, a_max=255))
        if self.transforms is not None:
            img, mask = self.transforms(img, mask)
        return img, mask

    @staticmethod
    def collate_fn(batch):
        images, targets = list(zip(*batch))
        return cat_list(images, fill_value=0), cat_list(targets, fill_value=255)


def cat_list(images, fill_value=0):
    max_size = tuple(max(s) for s in zip(*[img.shape for img in images]))
    batch_shape = (len(images),) + max_size
    batched_imgs = images[0].new(*batch_shape).fill_(fill_value)
    for img, pad_img in zip(images, batched_imgs):
        pad_img[..., : img.shape[-2], : img.shape[-1]].copy_(img)
    return batched_imgs


# ---------------------------------------------------------------------------
# validation metrics with a host sync per update


class ConfusionMatrix(utils.ConfusionMatrix):
    """The project's matrix (same compute and printout) with the tutorial's update."""

    def update(self, a, b):
        n = self.num_classes
        if self.mat is None:
            self.mat = torch.zeros((n, n), dtype=torch.int64, device=a.device)
        with torch.no_grad():
            k = (a >= 0) & (a < n)
            inds = n * a[k].to(torch.int64) + b[k]  # boolean indexing: output size known only on the host
            self.mat += torch.bincount(inds, minlength=n ** 2).reshape(n, n)


class DiceCoefficient(utils.DiceCoefficient):
    """The tutorial's per-batch dice: the batch's mean added once per update (one host sync in the loop dice)."""

    def update(self, pred, target):
        if self.cumulative_dice is None:
            self.cumulative_dice = torch.zeros(1, dtype=pred.dtype, device=pred.device)
            self.count = torch.zeros(1, dtype=pred.dtype, device=pred.device)
        pred = F.one_hot(pred.argmax(dim=1), self.num_classes).permute(0, 3, 1, 2).float()
        dice_target = build_target(target, self.num_classes, self.ignore_index)
        self.cumulative_dice += multiclass_dice_coeff(pred[:, 1:], dice_target[:, 1:], ignore_index=self.ignore_index)
        self.count += 1


# ---------------------------------------------------------------------------
# the engine


def train_one_epoch(model, optimizer, data_loader, device, num_classes, lr_scheduler):
    """The tutorial's loop without AMP: returns (mean loss, last lr); one ``loss.item()`` per step."""
    model.train()
    loss_weight = torch.as_tensor([1.0, 2.0], device=device) if num_classes == 2 else None
    total, steps, lr = 0.0, 0, optimizer.param_groups[0]["lr"]
    for image, target in data_loader:
        image, target = image.to(device), target.to(device)
        output = model(image)
        loss = criterion(output, target, loss_weight, num_classes=num_classes, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        lr = optimizer.param_groups[0]["lr"]
        value = loss.item()
        if not math.isfinite(value):
            raise RuntimeError(f"non-finite loss {value}")
        total += value
        steps += 1
    return total / max(steps, 1), lr


@torch.no_grad()
def evaluate(model, data_loader, device, num_classes):
    """The tutorial's validation: returns (ConfusionMatrix, dice as a float)."""
    model.eval()
    confmat = ConfusionMatrix(num_classes)
    dice = DiceCoefficient(num_classes=num_classes, ignore_index=255)
    for image, target in data_loader:
        image, target = image.to(device), target.to(device)
        output = model(image)["out"]
        confmat.update(target.flatten(), output.argmax(1).flatten())
        dice.update(output, target)
    return confmat, dice.value.item()


# ---------------------------------------------------------------------------
# the tutorial's main


def main(argv=None):
    parser = argparse.ArgumentParser(description="The tutorial-style training run (baseline of benchmark.py)")
    parser.add_argument("--data-path", required=True, help="folder that holds DRIVE/")
    parser.add_argument("--epochs", default=3, type=int)
    parser.add_argument("-b", "--batch-size", default=4, type=int)
    parser.add_argument("--base-c", default=32, type=int)
    parser.add_argument("--crop-size", default=480, type=int)
    parser.add_argument("--device", default="cuda", help="the tutorial's default; the CPU when CUDA is absent")
    parser.add_argument("--output-dir", default="save_weights_reference")
    args = parser.parse_args(argv)
    device = torch.device(args.device if torch.cuda.is_available() else "cpu")
    num_classes = 2
    train_dataset = DriveDataset(args.data_path, True, get_transform(True, crop_size=args.crop_size))
    val_dataset = DriveDataset(args.data_path, False, get_transform(False))
    num_workers = min(os.cpu_count() or 1, args.batch_size if args.batch_size > 1 else 0, 8)
    train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=args.batch_size, num_workers=num_workers,
                                               shuffle=True, pin_memory=True, collate_fn=train_dataset.collate_fn)
    val_loader = torch.utils.data.DataLoader(val_dataset, batch_size=1, num_workers=num_workers, pin_memory=True,
                                             collate_fn=val_dataset.collate_fn)
    model = UNet(in_channels=3, num_classes=num_classes, base_c=args.base_c).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    lr_scheduler = create_lr_scheduler(optimizer, len(train_loader), args.epochs, warmup=True)
    os.makedirs(args.output_dir, exist_ok=True)
    results_file = os.path.join(args.output_dir, "results{}.txt".format(
        datetime.datetime.now().strftime("%Y%m%d-%H%M%S")))
    best_dice = 0.0
    for epoch in range(args.epochs):
        t = time.time()
        mean_loss, lr = train_one_epoch(model, optimizer, train_loader, device, num_classes, lr_scheduler)
        confmat, dice = evaluate(model, val_loader, device, num_classes)
        val_info = str(confmat)
        print(val_info)
        print(f"dice coefficient: {dice:.3f}")
        with open(results_file, "a") as f:
            f.write(f"[epoch: {epoch}]\ntrain_loss: {mean_loss:.4f}\nlr: {lr:.6f}\ndice coefficient: {dice:.3f}\n"
                    + val_info + "\n\n")
        if dice > best_dice:
            best_dice = dice
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch},
                       os.path.join(args.output_dir, "best_model.pth"))
        print(f"epoch {epoch}: {time.time() - t:.1f} s, loss {mean_loss:.4f}", flush=True)


if __name__ == "__main__":
    main()
