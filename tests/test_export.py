"""export.py (ONNX and torch.export), the exported models' agreement with PyTorch at odd sizes, predict.py with an
.onnx model, docs/export.md's PyTorch-free snippet, and the one-line errors for missing extras and bad input."""
import os
import re
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import export
import predict
from src import build_model
from src.unet import Up
from tests.conftest import ROOT, run_script, spread_output
from train_utils.errors import UserError
from train_utils.synthetic import write_synthetic_drive

ODD_SIZES = [(61, 45), (77, 93)]  # (height, width)


def old_up_forward(self, x1, x2):
    """``Up.forward`` as it was before export support: a Python ``if`` on the sizes."""
    x1 = self.up(x1)
    diff_y = x2.size(2) - x1.size(2)
    diff_x = x2.size(3) - x1.size(3)
    if diff_y or diff_x:
        x1 = F.pad(x1, [diff_x // 2, diff_x - diff_x // 2, diff_y // 2, diff_y - diff_y // 2])
    return self.conv(torch.cat([x2, x1], dim=1))


def trained_like_unet(num_classes=2, seed=0):
    """A random U-Net (base_c 8) with non-trivial BatchNorm statistics and logits that split the image into
    both classes, in eval mode, so agreement tests compare real decisions."""
    torch.manual_seed(seed)
    model = build_model("unet", num_classes=num_classes, base_c=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.7, 1.3)
                m.bias.uniform_(-0.2, 0.2)
    return spread_output(model, torch.randn(2, 3, 64, 64))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # The ONNX export needs the optional extras (requirements-extras.txt): without them these tests skip.
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    root = tmp_path_factory.mktemp("export")
    model = trained_like_unet()
    ckpt = root / "best_model.pth"
    args = {"model": "unet", "num_classes": 1, "base_c": 8, "mean": [0.6, 0.35, 0.2], "std": [0.15, 0.1, 0.05]}
    torch.save({"model": model.state_dict(), "args": args, "epoch": 7, "best_dice": 0.5}, ckpt)
    onnx_path = root / "unet.onnx"
    r = run_script("export.py", "--weights", ckpt, "--format", "onnx", "--output", onnx_path, timeout=300)
    assert r.returncode == 0, r.stderr
    return {"root": root, "model": model, "ckpt": ckpt, "onnx": onnx_path, "args": args, "export_stdout": r.stdout}


def test_up_gives_the_same_output_as_before_in_eager_mode():
    torch.manual_seed(0)
    model = build_model("unet", num_classes=2, base_c=4).eval()
    with torch.no_grad():
        for h, w in [*ODD_SIZES, (64, 48), (33, 17)]:
            x = torch.randn(1, 3, h, w)
            new = model(x)["out"]
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(Up, "forward", old_up_forward)
                old = model(x)["out"]
            assert torch.equal(new, old), (h, w)
        # a skip one pixel smaller than the upsampled map (the MobileNet U-Net's case): the pad crops
        up = Up(8, 4).eval()
        for skip_hw in [(5, 7), (6, 5), (4, 4), (7, 8)]:
            x1, x2 = torch.randn(1, 4, 3, 3), torch.randn(1, 4, *skip_hw)
            assert torch.equal(up(x1, x2), old_up_forward(up, x1, x2)), skip_hw


def test_onnx_matches_pytorch_on_odd_sizes(env):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(env["onnx"]), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("image", "logits")
    assert inp.shape[1] == 3 and all(isinstance(d, str) for d in (inp.shape[0], inp.shape[2], inp.shape[3]))
    torch.manual_seed(1)
    diffs = []
    for (h, w), n in zip(ODD_SIZES, (1, 2)):  # dynamic batch too
        x = torch.randn(n, 3, h, w)
        with torch.no_grad():
            expected = env["model"](x)["out"].numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == expected.shape == (n, 2, h, w)
        diffs.append(float(np.abs(got - expected).max()))
        assert diffs[-1] <= 1e-4, (h, w, diffs[-1])
        assert (got.argmax(1) == expected.argmax(1)).mean() > 0.999
    print(f"onnxruntime vs PyTorch, max abs difference on {ODD_SIZES}: {diffs}")
    assert re.search(r"check: onnxruntime agrees with PyTorch on a \d+x\d+ input", env["export_stdout"])


def test_onnx_metadata_describes_the_model(env):
    onnx = pytest.importorskip("onnx")
    values = {p.key: json.loads(p.value) for p in onnx.load(str(env["onnx"])).metadata_props}
    assert values["model"] == "unet" and values["num_classes"] == 1 and values["base_c"] == 8
    assert values["mean"] == env["args"]["mean"] and values["std"] == env["args"]["std"]
    assert values["epoch"] == 7 and values["source"] == "best_model.pth"


def test_pt2_export_loads_and_agrees(env):
    out = env["root"] / "unet.pt2"
    export.main(export.get_args_parser().parse_args(["--weights", str(env["ckpt"]), "--output", str(out)]))
    extra = {export.PT2_META_FILE: ""}
    program = torch.export.load(str(out), extra_files=extra)
    assert '"mean": [0.6, 0.35, 0.2]' in extra[export.PT2_META_FILE]
    module = program.module()
    torch.manual_seed(2)
    for h, w in ODD_SIZES:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            expected = env["model"](x)["out"]
        assert (module(x) - expected).abs().max().item() <= 1e-4


def drive_images(root, sizes):
    """One folder of synthetic DRIVE test images of several sizes, with a folder of their FOV masks."""
    images, masks = root / "images", root / "masks"
    images.mkdir(), masks.mkdir()
    for k, (h, w) in enumerate(sizes):
        data = root / f"data{k}"
        write_synthetic_drive(str(data), num_train=0, num_test=1, height=h, width=w, seed=k)
        shutil.copy(data / "DRIVE/test/images/01_test.tif", images / f"{k}_test.tif")
        shutil.copy(data / "DRIVE/test/mask/01_test_mask.gif", masks / f"{k}_test_mask.gif")
    return images, masks


def run_predict(*argv):
    predict.main(predict.get_args_parser().parse_args([str(a) for a in argv]))


def test_predict_with_onnx_gives_the_same_masks(env, tmp_path):
    pytest.importorskip("onnxruntime")
    images, masks = drive_images(tmp_path, ODD_SIZES)
    for weights, out in ((env["ckpt"], tmp_path / "pth"), (env["onnx"], tmp_path / "onnx")):
        run_predict("--weights", weights, "--img", images, "--roi-mask", masks, "--output", out, "--save-prob",
                    "--device", "cpu")
    for k, (h, w) in enumerate(ODD_SIZES):
        a = np.array(Image.open(tmp_path / "pth" / f"{k}_test.png"))
        b = np.array(Image.open(tmp_path / "onnx" / f"{k}_test.png"))
        assert a.shape == (h, w) and 0.05 < (a == 255).mean() < 0.95  # both classes predicted
        assert np.array_equal(a, b), k
        pa = np.array(Image.open(tmp_path / "pth" / f"{k}_test_prob.png")).astype(int)
        pb = np.array(Image.open(tmp_path / "onnx" / f"{k}_test_prob.png")).astype(int)
        assert np.abs(pa - pb).max() <= 1


def readme_snippet():
    text = open(os.path.join(ROOT, "docs", "export.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    found = [b for b in blocks if "onnxruntime" in b]
    assert len(found) == 1, "docs/export.md: one python block using onnxruntime"
    return found[0]


def test_readme_onnx_snippet_runs_without_pytorch(env, tmp_path):
    pytest.importorskip("onnxruntime")
    images, masks = drive_images(tmp_path, ODD_SIZES[:1])
    work = tmp_path / "deploy"
    work.mkdir()
    shutil.copy(env["onnx"], work / "unet.onnx")
    shutil.copy(images / "0_test.tif", work / "01_test.tif")
    shutil.copy(masks / "0_test_mask.gif", work / "01_test_mask.gif")
    (work / "snippet.py").write_text(readme_snippet())
    # torch (and this repository) unavailable: the snippet needs numpy, Pillow and onnxruntime only
    code = ("import sys; sys.modules['torch'] = None; sys.path = [p for p in sys.path if p not in ('', '.')]; "
            "exec(open('snippet.py').read())")
    r = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr
    run_predict("--weights", env["onnx"], "--img", work / "01_test.tif", "--roi-mask", work / "01_test_mask.gif",
                "--output", tmp_path / "predicted.png")
    a = np.array(Image.open(work / "01_test.png"))
    b = np.array(Image.open(tmp_path / "predicted.png"))
    assert a.shape == b.shape and (a == b).mean() > 0.99


# ---------------------------------------------------------------------------
# errors: one line, non-zero exit, nothing half-written


def one_error_line(r):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def blocked(module, script):
    """A command running ``script`` as __main__ with ``module`` unimportable, as if not installed."""
    return [sys.executable, "-c", f"import sys, runpy; sys.modules[{module!r}] = None; "
                                  f"sys.argv = [{script!r}] + sys.argv[1:]; "
                                  f"runpy.run_path({os.path.join(ROOT, script)!r}, run_name='__main__')"]


@pytest.mark.parametrize("module", ["onnx", "onnxscript"])
def test_export_without_onnx_packages_is_one_line(env, tmp_path, module):
    out = tmp_path / "m.onnx"
    line = one_error_line(run_script(blocked(module, "export.py"), "--weights", env["ckpt"], "--output", out))
    assert "pip install" in line and "requirements-extras.txt" in line and module in line
    assert not out.exists()


def test_predict_without_onnxruntime_is_one_line(env, tmp_path):
    images, masks = drive_images(tmp_path, ODD_SIZES[:1])
    r = run_script(blocked("onnxruntime", "predict.py"), "--weights", env["onnx"], "--img", images,
                   "--output", tmp_path / "out")
    line = one_error_line(r)
    assert "onnxruntime" in line and "pip install" in line
    assert not (tmp_path / "out").exists()


def test_export_errors_are_one_line(env, tmp_path):
    line = one_error_line(run_script("export.py", "--weights", tmp_path / "nope.pth", "--format", "onnx",
                                     "--output", tmp_path / "x.onnx"))
    assert "nope.pth" in line and "not found" in line
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    line = one_error_line(run_script("export.py", "--weights", env["ckpt"], "--output", blocker / "x.onnx"))
    assert "cannot write" in line
    line = one_error_line(run_script("export.py", "--weights", env["ckpt"], "--format", "onnx",
                                     "--output", tmp_path / "x.pt2"))
    assert "must end in .onnx" in line


def test_a_failed_export_keeps_the_existing_file(env, tmp_path, monkeypatch):
    out = tmp_path / "unet.pt2"
    out.write_bytes(b"a good model from yesterday")
    monkeypatch.setattr(export, "CHECK_TOLERANCE", -1.0)  # every check fails
    with pytest.raises(UserError, match="disagrees"):
        export.main(export.get_args_parser().parse_args(["--weights", str(env["ckpt"]), "--output", str(out)]))
    assert out.read_bytes() == b"a good model from yesterday"
    assert os.listdir(tmp_path) == ["unet.pt2"]  # no temporary file left


def test_predict_rejects_gpu_and_amp_for_onnx(env, tmp_path):
    images, _ = drive_images(tmp_path, ODD_SIZES[:1])
    for flags, match in ((["--device", "cuda"], "runs on the CPU"), (["--amp"], "--amp")):
        with pytest.raises(UserError, match=match):
            run_predict("--weights", env["onnx"], "--img", images, "--output", tmp_path / "o", *flags)
