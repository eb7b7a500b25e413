"""VesselDataset and the tutorial's DriveDataset, collate_fn, the synthetic writer, and the paired transforms."""
import gzip
import hashlib
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from my_dataset import DriveDataset, VesselDataset, cat_list, drive_files
from tests.conftest import run_script
from train_utils.errors import UserError
from train_utils.synthetic import WRITERS, synthetic_fundus, write_synthetic, write_synthetic_drive
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


# sha256sum of every file the synthetic writer wrote for 2 training and 1 test image of 40 x 36 (seed 7) before it
# moved to train_utils/synthetic.py; for the gzip-compressed files (STARE) of their content, since a gzip
# header holds the time it was written.
# JPEG and PNG bytes depend on Pillow's libjpeg and zlib: after upgrading Pillow, recompute these from code
# known to be unchanged.
SYNTHETIC_SHA256 = """
3a68af563de65ee24d3ba16246a6d9e0a91b2d141c046893e5c61923f6ba2387  chase_db1/Image_01L.jpg
e7954c943d675c0e9593bb38b4444bcaf58b07aeeb739a1c9407856ac2a003b3  chase_db1/Image_01L_1stHO.png
e7954c943d675c0e9593bb38b4444bcaf58b07aeeb739a1c9407856ac2a003b3  chase_db1/Image_01L_2ndHO.png
926cfaa336ae983d878ddfd4259b90d2e7f5271c7d70610fa765568992b11982  chase_db1/Image_01R.jpg
f3a8a2148bdedfa279c6bdf14b7912e19dfb4d235a43b3bfac007576480042dc  chase_db1/Image_01R_1stHO.png
f3a8a2148bdedfa279c6bdf14b7912e19dfb4d235a43b3bfac007576480042dc  chase_db1/Image_01R_2ndHO.png
d40ed1b099a85881e327034ba41ff0de8df6432736069561959c4cfbcc3c2504  chase_db1/Image_11L.jpg
16e91937eca0170cf2fc458de0309e8abe6e992dd9d43ed009f0a2d11f7c1f90  chase_db1/Image_11L_1stHO.png
16e91937eca0170cf2fc458de0309e8abe6e992dd9d43ed009f0a2d11f7c1f90  chase_db1/Image_11L_2ndHO.png
6bd99315980dc313a6b55cb187265e36e86f67796786ad9518974b7eccd7b75c  chase_db1/synthetic.json
6089ce5fac0c4d3df15ef534b95821aa75e5dd66dff4f453e61e197667ef0612  drive/DRIVE/synthetic.json
75649d91376185449c6578d20c239c5e24347b0c6d8d09884f667e563f865d7a  drive/DRIVE/test/1st_manual/01_manual1.gif
45861e2dfb5c718c81d8d5d4fadde09604a91276af60212619315957f31b108d  drive/DRIVE/test/images/01_test.tif
d11588513c99bd9d4136d11a03dc8c727a355e22439f0ac24a63147e8cf159c0  drive/DRIVE/test/mask/01_test_mask.gif
4546e6e7fc05a28ba930cdf2f04b66cde684f1a359771ade0f4f16c8ea9d590d  drive/DRIVE/training/1st_manual/21_manual1.gif
c3c632d77d62ce2d3fcac977caf51279a729fa9db745f47b462dc354cfe0adc6  drive/DRIVE/training/1st_manual/22_manual1.gif
e7cc8dca413f3f09d1772404f43f09e608141ff696ca54ca8856b5252e403c42  drive/DRIVE/training/images/21_training.tif
19fda9d6de29f0691f530b400039725ee5365b1ab48c45422ac5e514f44f5478  drive/DRIVE/training/images/22_training.tif
d11588513c99bd9d4136d11a03dc8c727a355e22439f0ac24a63147e8cf159c0  drive/DRIVE/training/mask/21_training_mask.gif
d11588513c99bd9d4136d11a03dc8c727a355e22439f0ac24a63147e8cf159c0  drive/DRIVE/training/mask/22_training_mask.gif
cfad6983a0158a3d997f1b599aaa12b67e76b9d660bb745b46990df7cf6b42eb  folder/synthetic.json
4dde964f2440d2a8ff1e614b567fa7bf4d962291ccd601e7283f1638e55eac3a  folder/test/images/sample003.png
7542981b002789f103fd99018e3f22ac26abb5195fe4903d5e5af5d5159bcb2e  folder/test/labels/sample003.png
15d2dc55162282b4413e56eda7565a83fab4a514b988e98915c90207782ca135  folder/test/masks/sample003_mask.png
03d2868cde5d4fe72ec4baf4eb9adbb2ace4328e736e26e996638dad3d6ee4e7  folder/training/images/sample001.png
a73a469da4ec9b0afc826b028359a1131dd032e0eb47f684dc712862bee3dd9d  folder/training/images/sample002.png
54499cda3f25e6e11f397eae6526008c1e22f69097d295de86235533346cd99b  folder/training/labels/sample001.png
3ee742f1f92afa9992807c2616ef4151fe55e951b3de739c32e58b999a1b2d06  folder/training/labels/sample002.png
15d2dc55162282b4413e56eda7565a83fab4a514b988e98915c90207782ca135  folder/training/masks/sample001_mask.png
15d2dc55162282b4413e56eda7565a83fab4a514b988e98915c90207782ca135  folder/training/masks/sample002_mask.png
ee73a640a69244055786d3439f4be3272c58536097b98612878415995627848f  folder2/synthetic.json
4dde964f2440d2a8ff1e614b567fa7bf4d962291ccd601e7283f1638e55eac3a  folder2/test/images/sample003.png
1ad5fb846a1877e9eeefc23e393f883053a2c501842124d817ffc50f776ea599  folder2/test/labels/sample003.png
03d2868cde5d4fe72ec4baf4eb9adbb2ace4328e736e26e996638dad3d6ee4e7  folder2/training/images/sample001.png
a73a469da4ec9b0afc826b028359a1131dd032e0eb47f684dc712862bee3dd9d  folder2/training/images/sample002.png
6474cba9e1b579d1061d19eb1c62cb034b8292e3a400a7781360e7d01a0aaa04  folder2/training/labels/sample001.png
83f03e51da45398a26fb26fa1ffc204db79e150b2743be969558fe698934b361  folder2/training/labels/sample002.png
cb550013a843e431c1a7e17829e472612f3b32c8a96b9348db579db2d3495d14  hrf/images/01_dr.JPG
fa0ee2c7d080d8ffe9df877dc78337764d2f0b458ff9711b87c7cc6b847a7d4a  hrf/images/01_h.jpg
60374f75616b38ab4c07cc74933a63f800544faac5d9f3338d536308f4493dba  hrf/images/06_h.jpg
ebc84d3368a3296cbe43a8fc955fd9a9f7055224037aae39cd2c55388cd7742f  hrf/manual1/01_dr.tif
4e84f425b252c439c817235e4bca376003446b37ca8e06589ea1bf0ce38c34db  hrf/manual1/01_h.tif
e02b98384501f41f5a681945cc1b311194bb25a0361713311403c325e0156bb8  hrf/manual1/06_h.tif
1e952e6c3cf998b22c3e830bc671288930469e17f9d05e2145abb9d03906d572  hrf/mask/01_dr_mask.tif
1e952e6c3cf998b22c3e830bc671288930469e17f9d05e2145abb9d03906d572  hrf/mask/01_h_mask.tif
1e952e6c3cf998b22c3e830bc671288930469e17f9d05e2145abb9d03906d572  hrf/mask/06_h_mask.tif
2b33b7006702047e34c0c9476ca3b8096ec6dd87782308094ebdd967b51ab72e  hrf/synthetic.json
50f6d94cc093ac45797569d50d0ab1a1e02d11cdfc66bad47eccd4c024d57209  stare/labels-ah/im0001.ah.ppm.gz
48723eae21709cbc6628d2fe29362681b93602fe21a54223e4dcac8923622742  stare/labels-ah/im0002.ah.ppm.gz
f35f2dbf9cea7972c02ec24f8775dbb6d0cb287a2f204b154fa58a604c6eb49b  stare/labels-ah/im0003.ah.ppm.gz
50f6d94cc093ac45797569d50d0ab1a1e02d11cdfc66bad47eccd4c024d57209  stare/labels-vk/im0001.vk.ppm.gz
48723eae21709cbc6628d2fe29362681b93602fe21a54223e4dcac8923622742  stare/labels-vk/im0002.vk.ppm.gz
f35f2dbf9cea7972c02ec24f8775dbb6d0cb287a2f204b154fa58a604c6eb49b  stare/labels-vk/im0003.vk.ppm.gz
897d847395b9eedbb7a23498b77ad27e21578e122000b48b6a3f10335d65cfba  stare/stare-images/im0001.ppm.gz
08f6d6f48ed4f073f66d8aa87837a4a3a49982fddba6806e408fa7b7b8d253a4  stare/stare-images/im0002.ppm.gz
b8abfaa2f7b7e3c8b200b224584b406f4e6e6507d10e1403801d13869cefceda  stare/stare-images/im0003.ppm.gz
36f7c736f0b104eb1e3ce2fb7d53f7ab511735a719c0170582bc556180da9bd9  stare/stare-images/im0004.ppm.gz
7661940bde5372048f3f0aeec04c32afd342dae07fd73021c7020a89b97a325f  stare/synthetic.json
"""


def test_synthetic_writers_write_the_files_they_always_wrote(tmp_path):
    cases = {"drive": {}, "chase_db1": {}, "stare": {}, "hrf": {}, "folder": {},
             "folder2": dict(num_classes=2, masks=False)}
    # The artery/vein layouts came later (tests/test_arteries_veins.py reads them back against the generator).
    assert set(WRITERS) - {"drive_av", "hrf_av"} == {case.rstrip("2") for case in cases}
    found = {}
    for case, kw in cases.items():
        root = tmp_path / case
        write_synthetic(str(root), case.rstrip("2"), 2, 1, 40, 36, 7, **kw)
        for path in root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                found[f"{case}/{path.relative_to(root).as_posix()}"] = hashlib.sha256(
                    gzip.decompress(data) if path.name.endswith(".gz") else data).hexdigest()
    expected = {path: digest for digest, path in map(str.split, SYNTHETIC_SHA256.strip().split("\n"))}
    assert found == expected


def test_synthetic_command_line_names_and_hidden_aliases(tmp_path):
    r = run_script("my_dataset.py", "--help")
    assert r.returncode == 0, r.stderr
    words = r.stdout.split()
    assert "--dataset" in words and "--output-dir" in words and "--layout" not in words and "--out" not in words
    assert "(default: data/synthetic)" in " ".join(words) and "(default: drive)" in " ".join(words)
    # The old names still work, hidden: a chase_db1 layout under --out.
    r = run_script("my_dataset.py", "--out", tmp_path / "c", "--layout", "chase_db1", "--num-train", 2,
                   "--num-test", 1, "--height", 40, "--width", 36)
    assert r.returncode == 0, r.stderr
    assert "(chase_db1 layout)" in r.stdout and (tmp_path / "c" / "Image_11L_1stHO.png").is_file()
    r = run_script([sys.executable, "-m", "train_utils.synthetic"], "--output-dir", tmp_path / "d", "--num-train", 1,
                   "--num-test", 0, "--height", 40, "--width", 36)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "d" / "DRIVE" / "training" / "images" / "21_training.tif").is_file()


def test_dataset_targets_and_sorting(small_root):
    ds = VesselDataset(drive_files(str(small_root), "training"))
    assert [os.path.basename(p) for p in ds.img_list] == ["21_training.tif", "22_training.tif", "23_training.tif"]
    img, target = ds[0]
    assert img.shape == (3, 48, 44) and img.dtype == torch.uint8
    fov = np.array(Image.open(ds.roi_mask[0]).convert("L")) == 255
    manual = np.array(Image.open(ds.manual[0]).convert("L")) == 255
    t = target.numpy()
    assert np.array_equal(t == 255, ~fov)
    assert np.array_equal(t == 1, manual & fov)
    uncached = VesselDataset(drive_files(str(small_root), "training"), cache=False)
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


def pil_pipeline(sizes):
    """The tutorial's PIL transforms in small: a resize of the shorter side (nearest for the target), then
    ToTensor (a float image; the target's values as int64, as the tutorial's ``torch.as_tensor(np.array(t))``)."""
    sizes = iter(sizes)

    def transforms(img, target):
        size = next(sizes)
        img = TF.resize(img, size)
        target = TF.resize(target, size, interpolation=InterpolationMode.NEAREST)
        return TF.to_tensor(img), torch.as_tensor(np.array(target), dtype=torch.int64)

    return transforms


def test_drive_dataset_is_the_tutorials_pil_pair(small_root):
    """DriveDataset gives PIL images holding exactly VesselDataset's pixels and target values."""
    for train, split in ((True, "training"), (False, "test")):
        ds = DriveDataset(str(small_root), train=train)
        fast = VesselDataset(drive_files(str(small_root), split))
        assert ds.flag == split and len(ds) == len(fast) > 0
        assert (ds.img_list, ds.manual, ds.roi_mask) == (fast.img_list, fast.manual, fast.roi_mask)
        for k in range(len(ds)):
            img, target = ds[k]
            assert isinstance(img, Image.Image) and img.mode == "RGB"
            assert isinstance(target, Image.Image) and target.mode == "L"
            image, expected = fast[k]
            assert torch.equal(torch.from_numpy(np.array(img)).permute(2, 0, 1), image)
            assert torch.equal(torch.from_numpy(np.array(target)), expected)
            assert set(np.unique(np.array(target))) <= {0, 1, 255}
    # The tutorial's PIL transforms run on it, and collate_fn pads the differently sized results.
    ds = DriveDataset(str(small_root), train=True, transforms=pil_pipeline([40, 30, 24]))
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=DriveDataset.collate_fn)
    images, targets = next(iter(loader))
    # 48 x 44 images: the shorter side (44) to 40, 30, 24 gives 43 x 40, 32 x 30, 26 x 24.
    assert images.shape == (3, 3, 43, 40) and images.dtype == torch.float32
    assert targets.shape == (3, 43, 40) and targets.dtype == torch.int64
    assert targets[2, 26:].eq(255).all() and targets[2, :, 24:].eq(255).all()  # the padding: target 255 ...
    assert images[2, :, 26:].eq(0).all() and images[2, :, :, 24:].eq(0).all()  # ... image 0
    assert set(targets.unique().tolist()) == {0, 1, 255}


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
        VesselDataset(drive_files(str(small_root), "training"))
    label = small_root / "DRIVE/test/1st_manual/01_manual1.gif"
    Image.new("L", (10, 10)).save(label)
    with pytest.raises(UserError, match="01_manual1.gif' is 10x10 but its image"):
        VesselDataset(drive_files(str(small_root), "test"))


def test_interpolated_label_values_are_thresholded_at_half(small_root):
    """A label resized with interpolation has grey edges: >= 128 is vessel, below is background."""
    path = small_root / "DRIVE/test/1st_manual/01_manual1.gif"
    arr = np.zeros((48, 44), dtype=np.uint8)
    arr[10:20, 10:20] = 255
    arr[20, 10:20] = 128
    arr[21, 10:20] = 127
    Image.fromarray(arr).save(path)
    mask = np.array(Image.open(small_root / "DRIVE/test/mask/01_test_mask.gif").convert("L")) == 255
    target = VesselDataset(drive_files(str(small_root), "test"))[0][1].numpy()
    expected = np.where(mask, (arr >= 128).astype(np.uint8), 255)
    assert np.array_equal(target, expected)
    # A 0/1 label (maximum 1) is read as 0/1, not as all background.
    Image.fromarray((arr == 255).astype(np.uint8)).save(path.with_suffix(".png"))
    os.replace(path.with_suffix(".png"), path)
    target = VesselDataset(drive_files(str(small_root), "test"))[0][1].numpy()
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
