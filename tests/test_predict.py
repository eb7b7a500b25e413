"""predict.py end to end on synthetic DRIVE data, the tiled inference and the FOV estimate."""
import errno
import hashlib
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from src import build_model
from tests.conftest import leave_free, run_script, spread_output
from train_utils.errors import run_cli
from train_utils.imaging import estimate_fov
from train_utils.inference import blend_weights, predict_probabilities, predicted_classes, tile_grid
from train_utils.synthetic import synthetic_fundus, write_synthetic_drive
from train_utils.transforms import DRIVE_MEAN, DRIVE_STD, normalize_image

H, W = 96, 90


def spread_unet(num_classes, seed=0, calib=None):
    """A random tiny U-Net whose output layer is rescaled so its classes split the image roughly evenly.

    Left as initialised, the logits barely vary over the image, every pixel is
    background and the tests would prove nothing.
    """
    torch.manual_seed(seed)
    model = build_model("unet", num_classes=num_classes, base_c=8).eval()
    if calib is None:
        calib = synthetic_fundus(H, W, seed=seed)[0]
    return spread_output(model, normalize_image(torch.from_numpy(calib).permute(2, 0, 1)[None], DRIVE_MEAN, DRIVE_STD))


def write_checkpoint(path, model, num_classes):
    """A checkpoint in train.py's format (``num_classes`` counts foreground classes)."""
    args = {"model": "unet", "num_classes": num_classes, "base_c": 8, "mean": list(DRIVE_MEAN), "std": list(DRIVE_STD)}
    torch.save({"model": model.state_dict(), "args": args, "epoch": 0}, path)
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    write_synthetic_drive(str(root / "data"), num_train=0, num_test=2, height=H, width=W)
    drive = root / "data" / "DRIVE" / "test"
    return {
        "root": root,
        "images": drive / "images",
        "masks": drive / "mask",
        "ckpt": write_checkpoint(root / "binary.pth", spread_unet(2), 1),
        "ckpt3": write_checkpoint(root / "three.pth", spread_unet(3, seed=1), 2),
    }


def run_predict(*args):
    return run_script("predict.py", *args, timeout=120)


def error_lines(stderr):
    return [ln for ln in stderr.splitlines() if ln.strip()]


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def fov_of(env, stem):
    return np.array(Image.open(env["masks"] / f"{stem}_mask.gif").convert("L")) >= 128


def test_folder_with_masks_writes_mask_prob_overlay(env):
    out = env["root"] / "out_folder"
    before = {p.name: sha(p) for p in env["images"].iterdir()}
    r = run_predict("--weights", env["ckpt"], "--img", env["images"], "--roi-mask", env["masks"],
                    "--output", out, "--save-prob", "--overlay")
    assert r.returncode == 0, r.stderr
    assert {p.name: sha(p) for p in env["images"].iterdir()} == before  # inputs untouched
    for stem in ("01_test", "02_test"):
        assert re.search(rf"{stem}\.tif: 90x96 .*\d+\.\d\d s", r.stdout), r.stdout  # time per image
        fov = fov_of(env, stem)
        with Image.open(out / f"{stem}.png") as im:
            assert (im.mode, im.size) == ("L", (W, H))
            mask = np.array(im)
        with Image.open(out / f"{stem}_prob.png") as im:
            assert (im.mode, im.size) == ("L", (W, H))
            prob = np.array(im)
        with Image.open(out / f"{stem}_overlay.png") as im:
            assert (im.mode, im.size) == ("RGB", (W, H))
            overlay = np.array(im)
        assert set(np.unique(mask)) <= {0, 255}
        assert 0.05 < (mask[fov] == 255).mean() < 0.95  # the model predicts both classes
        assert not mask[~fov].any() and not prob[~fov].any()
        # mask is argmax, prob is round(255 * P(foreground)): they agree except at p = 0.5 exactly
        assert ((mask == 255) == (prob >= 128))[fov].mean() > 0.995
        photo = np.array(Image.open(env["images"] / f"{stem}.tif").convert("RGB"))
        assert np.array_equal(overlay[mask == 0], photo[mask == 0])
        assert (overlay[mask == 255][:, 1].astype(int) >= photo[mask == 255][:, 1]).all()  # green added


def test_single_file_without_mask_estimates_fov(env):
    out = env["root"] / "single" / "result.png"
    img = env["images"] / "01_test.tif"
    r = run_predict("--weights", env["ckpt"], "--input", img, "--output", out, "--save-prob")
    assert r.returncode == 0, r.stderr
    assert "estimated" in r.stdout and "--roi-mask" in r.stdout
    assert sorted(os.listdir(out.parent)) == ["result.png", "result_prob.png"]
    mask, prob = np.array(Image.open(out)), np.array(Image.open(out.parent / "result_prob.png"))
    fov = fov_of(env, "01_test")  # the estimate is checked closely in test_estimated_fov_matches_synthetic_mask
    assert not mask[~fov].any() and not prob[~fov].any()
    assert (mask[fov] == 255).mean() > 0.05


def test_three_classes_give_a_palette_png(env):
    out = env["root"] / "three"
    r = run_predict("--weights", env["ckpt3"], "--img", env["images"] / "02_test.tif",
                    "--roi-mask", env["masks"], "--output", out, "--tta", "--tile-size", "48",
                    "--tile-overlap", "16", "-b", "3")
    assert r.returncode == 0, r.stderr
    assert "3 classes" in r.stdout and "tiles" in r.stdout
    with Image.open(out / "02_test.png") as im:
        assert (im.mode, im.size) == ("P", (W, H))
        classes = np.array(im)
    fov = fov_of(env, "02_test")
    assert set(np.unique(classes[fov])) == {0, 1, 2}
    assert not classes[~fov].any()


def test_threshold_draws_vessels_above_it_and_travels_with_the_exported_model(env):
    """--threshold P: a vessel wherever the written probability's unrounded value exceeds P; export.py
    --threshold stores it as the model's own (predict.py's default), and a typed one still wins."""
    out = env["root"] / "thresholds"
    fov = fov_of(env, "01_test")
    img = env["images"] / "01_test.tif"
    common = ("--img", img, "--roi-mask", env["masks"], "--save-prob")
    masks = {}
    for t in ("0.3", "0.7"):
        r = run_predict("--weights", env["ckpt"], *common, "--output", out / t / "m.png", "--threshold", t)
        assert r.returncode == 0, r.stderr
        masks[t] = np.array(Image.open(out / t / "m.png")) == 255
        prob = np.array(Image.open(out / t / "m_prob.png")).astype(float) / 255
        # The probability PNG is rounded to 1/255: only pixels within half a step of P may differ.
        far = np.abs(prob - float(t)) > 0.5 / 255
        assert np.array_equal(masks[t][far & fov], (prob > float(t))[far & fov])
        assert not masks[t][~fov].any()
    assert masks["0.3"].sum() > masks["0.7"].sum() > 0 and not (masks["0.7"] & ~masks["0.3"]).any()
    shipped = env["root"] / "with_threshold.pth"
    r = run_script("export.py", "--weights", env["ckpt"], "--format", "pth", "--output", shipped,
                   "--threshold", "0.7", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "exceeds 0.7" in r.stdout
    assert torch.load(shipped, weights_only=True)["args"]["vessel_threshold"] == 0.7
    r = run_predict("--weights", shipped, *common, "--output", out / "own" / "m.png")
    assert r.returncode == 0, r.stderr
    own = np.array(Image.open(out / "own" / "m.png")) == 255
    assert (own != masks["0.7"]).mean() < 0.002  # float16 storage may move a pixel at the edge
    r = run_predict("--weights", shipped, *common, "--output", out / "typed" / "m.png", "--threshold", "0.3")
    assert r.returncode == 0, r.stderr
    assert (np.array(Image.open(out / "typed" / "m.png")) == 255).sum() > own.sum()
    for bad in ("0", "1.5"):
        r = run_predict("--weights", env["ckpt"], *common, "--output", out / "bad.png", "--threshold", bad)
        assert r.returncode != 0 and error_lines(r.stderr) == [f"error: --threshold must be between 0 and 1 (got {bad})"]


def test_predicted_classes_against_a_loop():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 7, 9, generator=g) * 2, 0)
    probs[:, 0, 0] = torch.tensor([0.5, 0.5, 0.0])  # a tie between background and vessel
    for threshold in (None, 0.2, 0.5, 0.8):
        got = predicted_classes(probs, threshold)
        for i in range(7):
            for j in range(9):
                p = probs[:, i, j].tolist()
                if threshold is None:
                    want = max(range(3), key=lambda c: (p[c], -c))  # the first of equal maxima
                else:
                    want = (1 + max(range(2), key=lambda c: (p[1 + c], -c))) if 1 - p[0] > threshold else 0
                assert got[i, j] == want, (threshold, i, j, p)
    assert predicted_classes(probs[:2] / probs[:2].sum(0), None)[0, 0] == 0  # two classes, a tie: background


@pytest.mark.parametrize("batch_size,tta", [(1, False), (2, True), (8, False)])
def test_whole_images_are_the_models_softmax(batch_size, tta):
    # Images that fit in one tile: per image, the softmax of the model's output for the normalised image
    # (with tta, its mean over the image and its two flips, each flipped back), in batches of any size.
    imgs = [synthetic_fundus(120, 110, seed=k)[0] for k in range(3)]
    model = spread_unet(2, calib=imgs[0]).eval()
    x = torch.stack([torch.from_numpy(img).permute(2, 0, 1) for img in imgs])
    probs, tiles = predict_probabilities(model, x, DRIVE_MEAN, DRIVE_STD, tile_size=0, batch_size=batch_size,
                                         tta=tta)
    assert tiles == 1 and probs.shape == (3, 2, 120, 110)
    mean, std = torch.tensor(DRIVE_MEAN).view(3, 1, 1), torch.tensor(DRIVE_STD).view(3, 1, 1)
    with torch.no_grad():
        for k in range(3):
            image = ((x[k].float() / 255 - mean) / std)[None]
            views = [(), (3,), (2,)] if tta else [()]
            expected = sum(torch.softmax(model(image.flip(d) if d else image)["out"], 1).flip(d) if d else
                           torch.softmax(model(image)["out"], 1) for d in views) / len(views)
            assert torch.allclose(probs[k], expected[0], atol=1e-5)


def test_tiled_prediction_matches_whole_image():
    img = synthetic_fundus(200, 190, seed=3)[0]
    model = spread_unet(2, calib=img)
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    whole, n_whole = predict_probabilities(model, x, DRIVE_MEAN, DRIVE_STD, tile_size=0)
    tiled, n_tiles = predict_probabilities(model, x, DRIVE_MEAN, DRIVE_STD, tile_size=96, tile_overlap=32,
                                           batch_size=4)
    assert (n_whole, n_tiles) == (1, 9)
    assert tiled.shape == whole.shape == (1, 2, 200, 190)
    assert torch.allclose(tiled.sum(1), torch.ones(1, 200, 190), atol=1e-5)
    assert (tiled - whole).abs().max() < 0.05
    assert (tiled.argmax(1) == whole.argmax(1)).float().mean() > 0.99
    # a tile that holds the whole image is the whole-image prediction
    one, n = predict_probabilities(model, x, DRIVE_MEAN, DRIVE_STD, tile_size=256)
    assert n == 1 and torch.equal(one, whole)


def test_tile_grid_and_blend_weights():
    windows, overlap = tile_grid(2300, 3500, 1024, 128)
    # the fewest tiles of at most 1024 that overlap by 128: 3 rows of (2300 + 2 * 128) / 3 and 4 columns of
    # (3500 + 3 * 128) / 4, each rounded up to a multiple of 16, spread evenly, the last ones flush
    assert overlap == 128 and all((th, tw) == (864, 976) for _, _, th, tw in windows)
    ys, xs = sorted({y for y, *_ in windows}), sorted({x for _, x, *_ in windows})
    assert ys == [0, 718, 2300 - 864] and xs == [0, 841, 1682, 3500 - 976]
    assert max(b - a for a, b in zip(xs, xs[1:])) <= 976 - 128 and max(b - a for a, b in zip(ys, ys[1:])) <= 864 - 128
    # a working image a little wider than a tile (HRF at a FOV of 1024 px) takes two tiles of about half of it
    windows, _ = tile_grid(725, 1087, 1024, 128)
    assert [(y, x, th, tw) for y, x, th, tw in windows] == [(0, 0, 725, 608), (0, 479, 725, 608)]
    first, second = blend_weights(0, 1024, 2304, 128), blend_weights(896, 1024, 2304, 128)
    assert (first > 0).all() and (second > 0).all()
    assert first[0] == 1 and blend_weights(1280, 1024, 2304, 128)[-1] == 1  # image edges keep weight 1
    assert second[0] < 0.01 and second[-1] < 0.01
    # neighbouring ramps cross-fade: the weights of the two tiles sum to 1 over their overlap
    assert torch.allclose(first[896:] + second[:128], torch.ones(128), atol=1e-6)
    assert tile_grid(96, 90, 0, 0) == ([(0, 0, 96, 90)], 0)  # one tile: the whole image, unpadded
    assert tile_grid(96, 90, 96, 16) == ([(0, 0, 96, 90)], 0)


@pytest.mark.parametrize("height,width,seed,grid", [(96, 90, 0, 256), (300, 280, 1, 64), (584, 565, 2, 256)])
def test_estimated_fov_matches_synthetic_mask(height, width, seed, grid):
    img, _, fov = synthetic_fundus(height, width, seed=seed)
    rng = np.random.default_rng(seed)
    img = img.copy()
    img[2:5, 2:5] = 255  # a bright speck in the dark border (a camera label) is not the FOV
    cy, cx = height // 2, width // 2
    img[cy - 4:cy + 4, cx - 4:cx + 4] = rng.integers(0, 3, (8, 8, 3))  # a dark lesion inside is
    for image in (img, img[..., 1]):  # RGB, and grayscale
        est, _ = estimate_fov(image, grid=grid)
        assert est.shape == fov.shape
        assert (est & fov).sum() / (est | fov).sum() > 0.95
        assert not est[2:5, 2:5].any() and est[cy - 4:cy + 4, cx - 4:cx + 4].all()


@pytest.mark.parametrize("case", ["missing", "not_an_image"])
def test_bad_input_is_one_error_line(env, case):
    path = env["root"] / "nope.tif"
    if case == "not_an_image":
        path = env["root"] / "notes.txt"
        path.write_text("not a photograph\n")
    r = run_predict("--weights", env["ckpt"], "--img", path, "--output", env["root"] / "err")
    assert r.returncode != 0
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:") and str(path) in lines[0], r.stderr


def test_code_running_pickle_is_refused(env, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "evil.pth"
    torch.save({"model": {"x": Payload()}, "args": {}}, bad)
    r = run_predict("--weights", bad, "--img", env["images"] / "01_test.tif", "--output", tmp_path / "o")
    assert r.returncode != 0 and not marker.exists()
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: refusing to load"), r.stderr


def call_main(capsys, *argv):
    """predict's main under run_cli, in this process: (exit code, stderr lines)."""
    args = predict.get_args_parser().parse_args([str(a) for a in argv])
    code = 0
    try:
        run_cli(predict.main, args)
    except SystemExit as e:
        code = e.code
    return code, error_lines(capsys.readouterr().err)


def test_user_errors_in_process(env, tmp_path, capsys):
    img = env["images"] / "01_test.tif"
    # a mask folder without this image's mask
    empty = tmp_path / "masks"
    empty.mkdir()
    code, lines = call_main(capsys, "--weights", env["ckpt"], "--img", img, "--roi-mask", empty, "--output", tmp_path)
    assert code == 1 and len(lines) == 1 and "no FOV mask" in lines[0] and "01_test_mask.gif" in lines[0]
    # a mask of another size
    Image.new("L", (W + 1, H), 255).save(empty / "01_test_mask.gif")
    code, lines = call_main(capsys, "--weights", env["ckpt"], "--img", img, "--roi-mask", empty, "--output", tmp_path)
    assert code == 1 and len(lines) == 1 and "91x96" in lines[0]
    # writing the mask over the input photograph
    photo = tmp_path / "photo.png"
    Image.open(img).save(photo)
    before = sha(photo)
    code, lines = call_main(capsys, "--weights", env["ckpt"], "--img", photo, "--output", tmp_path)
    assert code == 1 and len(lines) == 1 and "overwrite" in lines[0] and sha(photo) == before
    # --device cuda where there is none (as on every machine for a test not marked cuda: conftest.py)
    code, lines = call_main(capsys, "--weights", env["ckpt"], "--img", img, "--device", "cuda",
                            "--output", tmp_path / "o")
    assert code == 1 and len(lines) == 1 and "CUDA is not available" in lines[0]


def test_in_process_mask_lookup_and_batches(env, tmp_path, capsys):
    """Folder mode with one mask file for all images, a batch of two, and DRIVE names resolved."""
    assert predict.find_mask(str(env["masks"]), str(env["images"] / "01_test.tif")).endswith("01_test_mask.gif")
    (tmp_path / "02_test.png").write_bytes(b"")  # <stem>.<ext> is accepted too, <stem>_mask.* first
    assert predict.find_mask(str(tmp_path), "x/02_test.tif").endswith("02_test.png")
    args = predict.get_args_parser().parse_args(
        ["--weights", env["ckpt"], "--img", str(env["images"]), "--roi-mask", str(env["masks"] / "01_test_mask.gif"),
         "--output", str(tmp_path / "o"), "-b", "2"])
    predict.main(args)
    assert sorted(os.listdir(tmp_path / "o")) == ["01_test.png", "02_test.png", "predict_run.json"]


def test_prediction_is_the_evaluated_argmax_on_odd_sizes(tmp_path):
    """predict.py's mask is, inside the FOV, the argmax of the model on the whole unpadded image.

    That is what ``train.py --test-only`` scores. The U-Net's ``align_corners=True``
    upsampling makes its output depend on the input size, so padding an image that
    fits in one tile (here to 112 x 96) would change the mask.
    """
    h, w = 101, 87
    img, _, fov = synthetic_fundus(h, w, seed=5)
    model = spread_unet(2, calib=img)
    ckpt = write_checkpoint(tmp_path / "m.pth", model, 1)
    Image.fromarray(img).save(tmp_path / "odd.tif")
    Image.fromarray(fov.astype(np.uint8) * 255).save(tmp_path / "odd_mask.gif")
    r = run_predict("--weights", ckpt, "--img", tmp_path / "odd.tif", "--roi-mask", tmp_path / "odd_mask.gif",
                    "--output", tmp_path / "odd.png")
    assert r.returncode == 0, r.stderr
    predicted = np.array(Image.open(tmp_path / "odd.png")) == 255
    x = normalize_image(torch.from_numpy(img).permute(2, 0, 1)[None], DRIVE_MEAN, DRIVE_STD)
    with torch.no_grad():
        expected = model.eval()(x)["out"][0].argmax(0).numpy() == 1
    assert 0.05 < expected[fov].mean() < 0.95  # the test model predicts both classes
    assert np.array_equal(predicted[fov], expected[fov]), f"{(predicted != expected)[fov].sum()} pixels differ"
    assert not predicted[~fov].any()


def test_odd_inputs_and_outputs_are_one_error_line(env, tmp_path, capsys):
    # an image smaller than the network can take
    Image.new("RGB", (10, 10), (120, 60, 30)).save(tmp_path / "tiny.png")
    code, lines = call_main(capsys, "--weights", env["ckpt"], "--img", tmp_path / "tiny.png",
                            "--output", tmp_path / "o")
    assert code == 1 and len(lines) == 1 and "is 10x10 pixels, smaller than the 16x16 the unet model needs" in lines[0]
    # --output naming an existing file, for a folder of images
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    code, lines = call_main(capsys, "--weights", env["ckpt"], "--img", env["images"], "--output", notes)
    assert code == 1 and len(lines) == 1 and "is a file, not a folder" in lines[0], lines
    assert notes.read_text() == "keep me"
    assert not (tmp_path / "o").exists()


def test_16_bit_photograph_is_scaled_not_saturated(env, tmp_path, capsys):
    grey = np.array(Image.open(env["images"] / "01_test.tif").convert("L"))
    Image.fromarray(grey).save(tmp_path / "a8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "a16.png")  # the same levels in 16 bits
    assert Image.open(tmp_path / "a16.png").mode.startswith("I")
    masks = []
    for name in ("a8", "a16"):
        code, lines = call_main(capsys, "--weights", env["ckpt"], "--img", tmp_path / f"{name}.png",
                                "--roi-mask", env["masks"] / "01_test_mask.gif", "--output", tmp_path / f"{name}_m.png")
        assert code == 0, lines
        masks.append(np.array(Image.open(tmp_path / f"{name}_m.png")))
    assert 0 < masks[0].mean() < 255 and np.array_equal(masks[0], masks[1])


def full_disk_for(part, real_save=Image.Image.save):
    """``Image.save`` failing as a full disk does for files whose name holds ``part``: half a file, then ENOSPC."""
    def save(self, fp, format=None, **params):
        if part not in str(fp):
            return real_save(self, fp, format, **params)
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half a picture")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return save


def test_full_disk_leaves_no_half_written_picture(env, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image.Image, "save", full_disk_for("_overlay"))
    out = tmp_path / "o"
    code, lines = call_main(capsys, "--weights", env["ckpt"], "--img", env["images"], "--roi-mask", env["masks"],
                            "--output-dir", out, "--save-prob", "--overlay")
    assert code == 1 and len(lines) == 1, lines
    assert re.fullmatch(r"error: cannot write '.*01_test_overlay\.png': the disk is full \(errno ENOSPC\).*", lines[0])
    assert sorted(os.listdir(out)) == ["01_test.png", "01_test_prob.png", "predict_run.json"]


def test_predicting_onto_a_really_full_disk(env, small_disk, capsys):
    disk = small_disk(2 ** 20)
    leave_free(disk, 12 * 1024)
    out = disk / "o"
    code, lines = call_main(capsys, "--weights", env["ckpt"], "--img", env["images"], "--roi-mask", env["masks"],
                            "--output-dir", out, "--save-prob", "--overlay")
    assert code == 1 and len(lines) == 1 and "the disk is full (errno ENOSPC)" in lines[0], lines
    pictures = [n for n in os.listdir(out) if n != "predict_run.json"]
    for name in pictures:  # whatever was written is whole
        Image.open(out / name).load()
    assert len(pictures) < 6 and not [n for n in os.listdir(out) if ".tmp" in n]
