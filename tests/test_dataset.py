"""DriveDataset, collate_fn, the synthetic writer, and the paired transforms."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from my_dataset import DriveDataset, cat_list, drive_files, synthetic_fundus, write_synthetic_drive
from train_utils.errors import UserError
from train_utils.transforms import DRIVE_MEAN, DRIVE_STD, get_transform


@pytest.fixture
def small_root(tmp_path):
    write_synthetic_drive(str(tmp_path), num_train=3, num_test=2, height=48, width=44, seed=3)
    return tmp_path


def test_synthetic_writer_is_deterministic_and_drive_shaped(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_synthetic_drive(str(a), num_train=2, num_test=1, height=40, width=36, seed=5)
    write_synthetic_drive(str(b), num_train=2, num_test=1, height=40, width=36, seed=5)
    for rel in ["DRIVE/training/images/21_training.tif", "DRIVE/training/1st_manual/22_manual1.gif",
                "DRIVE/training/mask/21_training_mask.gif", "DRIVE/test/images/01_test.tif",
                "DRIVE/test/1st_manual/01_manual1.gif", "DRIVE/test/mask/01_test_mask.gif"]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    img, vessel, fov = synthetic_fundus(40, 36, seed=[5, 21])
    assert img.shape == (40, 36, 3) and img.dtype == np.uint8
    assert vessel.any() and not (vessel & ~fov).any()  # labels are vessel pixels inside the FOV only
    label = np.array(Image.open(a / "DRIVE/training/1st_manual/21_manual1.gif").convert("L"))
    assert set(np.unique(label)) <= {0, 255}
    assert np.array_equal(label == 255, vessel)


def test_dataset_targets_and_sorting(small_root):
    ds = DriveDataset(str(small_root), train=True)
    assert [os.path.basename(p) for p in ds.img_list] == ["21_training.tif", "22_training.tif", "23_training.tif"]
    img, target = ds[0]
    assert img.shape == (3, 48, 44) and img.dtype == torch.uint8
    fov = np.array(Image.open(ds.roi_mask[0]).convert("L")) == 255
    manual = np.array(Image.open(ds.manual[0]).convert("L")) == 255
    t = target.numpy()
    assert np.array_equal(t == 255, ~fov)
    assert np.array_equal(t == 1, manual & fov)
    uncached = DriveDataset(str(small_root), train=True, cache=False)
    assert all(torch.equal(x, y) for x, y in zip(uncached[1], ds[1]))


def test_collate_pads_images_with_0_and_targets_with_255():
    imgs = [torch.ones(3, 4, 5), torch.ones(3, 6, 3)]
    targets = [torch.zeros(4, 5, dtype=torch.int64), torch.zeros(6, 3, dtype=torch.int64)]
    batch_img, batch_t = DriveDataset.collate_fn(list(zip(imgs, targets)))
    assert batch_img.shape == (2, 3, 6, 5) and batch_t.shape == (2, 6, 5)
    assert batch_img[0, :, 4:].eq(0).all() and batch_img[1, :, :, 3:].eq(0).all()
    assert batch_t[0, 4:].eq(255).all() and batch_t[1, :, 3:].eq(255).all()
    assert batch_t[0, :4].eq(0).all() and batch_img[1, :, :, :3].eq(1).all()
    assert torch.equal(cat_list([torch.ones(2, 2)] * 2), torch.ones(2, 2, 2))


def test_missing_drive_folder_and_files(small_root, tmp_path):
    with pytest.raises(UserError, match="must name the folder that holds DRIVE"):
        DriveDataset(str(tmp_path / "nowhere"), train=True)
    os.remove(small_root / "DRIVE/training/1st_manual/22_manual1.gif")
    with pytest.raises(UserError, match="22_manual1.gif"):
        drive_files(str(small_root), "training")
    os.remove(small_root / "DRIVE/test/mask/02_test_mask.gif")
    with pytest.raises(UserError, match="02_test_mask.gif"):
        DriveDataset(str(small_root), train=False)


def test_corrupt_image_and_size_mismatch_are_named(small_root):
    bad = small_root / "DRIVE/training/images/21_training.tif"
    bad.write_bytes(b"not a tiff at all")
    with pytest.raises(UserError, match="cannot decode image .*21_training.tif"):
        DriveDataset(str(small_root), train=True)
    label = small_root / "DRIVE/test/1st_manual/01_manual1.gif"
    Image.new("L", (10, 10)).save(label)
    with pytest.raises(UserError, match="01_manual1.gif' is 10x10 but its image"):
        DriveDataset(str(small_root), train=False)


def test_interpolated_label_values_are_thresholded_at_half(small_root):
    """A label resized with interpolation has grey edges: >= 128 is vessel, below is background."""
    path = small_root / "DRIVE/test/1st_manual/01_manual1.gif"
    arr = np.zeros((48, 44), dtype=np.uint8)
    arr[10:20, 10:20] = 255
    arr[20, 10:20] = 128
    arr[21, 10:20] = 127
    Image.fromarray(arr).save(path)
    mask = np.array(Image.open(small_root / "DRIVE/test/mask/01_test_mask.gif").convert("L")) == 255
    target = DriveDataset(str(small_root), train=False)[0][1].numpy()
    expected = np.where(mask, (arr >= 128).astype(np.uint8), 255)
    assert np.array_equal(target, expected)
    # A 0/1 label (maximum 1) is read as 0/1, not as all background.
    Image.fromarray((arr == 255).astype(np.uint8)).save(path.with_suffix(".png"))
    os.replace(path.with_suffix(".png"), path)
    target = DriveDataset(str(small_root), train=False)[0][1].numpy()
    assert np.array_equal(target, np.where(mask, (arr == 255).astype(np.uint8), 255))


def test_train_transform_keeps_image_and_mask_aligned():
    """The mask is a function of the image (bright blocks are class 1): every transform must keep it so."""
    torch.manual_seed(0)
    blocks = (torch.rand(6, 6) > 0.5).to(torch.uint8)
    mask = blocks.repeat_interleave(32, 0).repeat_interleave(32, 1)[:190, :181]
    img = (mask * 200 + 20).expand(3, -1, -1).contiguous()
    t = get_transform(True, mean=(0, 0, 0), std=(1, 1, 1), base_size=181, crop_size=120)
    padded = agree = total = 0
    for _ in range(30):
        x, y = t(img, mask)
        assert x.shape == (3, 120, 120) and y.shape == (120, 120) and y.dtype == torch.int64
        valid = y != 255
        pred = (x[0] > (110 / 255)).long()
        agree += (pred[valid] == y[valid]).sum().item()
        total += valid.sum().item()
        padded += (~valid).sum().item()
        assert x[:, ~valid].eq(0).all()  # padding: image 0 where the target is 255
    assert padded > 0  # some samples were smaller than the crop and got padded
    assert agree / total > 0.97  # only resize-blurred block edges may disagree


@pytest.mark.parametrize("scale_range", [(0.5, 1.2), (0.8, 1.0)])
def test_train_transform_resizes_within_the_scale_range(scale_range):
    """The shorter side of a training image lands in [MIN, MAX] x base_size, and the draws reach both ends."""
    base, (lo, hi) = 100, scale_range
    t = get_transform(True, mean=(0, 0, 0), std=(1, 1, 1), base_size=base, crop_size=200, scale_range=scale_range)
    img = torch.full((3, 100, 130), 200, dtype=torch.uint8)  # the crop (200) pads the whole image: nothing cut
    sides = set()
    for seed in range(200):
        torch.manual_seed(seed)
        _, y = t(img, torch.zeros(100, 130, dtype=torch.uint8))
        sides.add(int((y != 255).any(dim=1).sum()))  # rows that hold image: the resized shorter side
    assert int(lo * base) <= min(sides) <= int(lo * base) + 3, sorted(sides)
    assert int(hi * base) - 3 <= max(sides) <= int(hi * base), sorted(sides)


def test_eval_transform_is_convert_and_normalise():
    img = torch.randint(0, 256, (3, 10, 9), dtype=torch.uint8)
    target = torch.randint(0, 2, (10, 9), dtype=torch.uint8)
    x, y = get_transform(False)(img, target)
    mean = torch.tensor(DRIVE_MEAN).view(3, 1, 1)
    std = torch.tensor(DRIVE_STD).view(3, 1, 1)
    torch.testing.assert_close(x, (img.float() / 255 - mean) / std)
    assert torch.equal(y, target.long())
