"""Export a checkpoint written by ``train.py`` for deployment: ONNX (runs without PyTorch) or torch.export's .pt2.

    python export.py --weights save_weights/best_model.pth --format onnx --output unet.onnx
    python export.py --weights save_weights/best_model.pth --format pt2 --output unet.pt2
    python predict.py --weights unet.onnx --img DRIVE/test/images --roi-mask DRIVE/test/mask --output-dir predictions

Both formats hold the model in evaluation mode with BatchNorm folded into the
convolutions. Input ``image``: float32 ``[N, 3, H, W]``, the RGB photograph
scaled to 0..1 and normalised with the training mean and std
(``(x / 255 - mean) / std``); output ``logits``: float32 ``[N, C, H, W]``
(C = foreground classes + 1; the softmax's argmax is the predicted class). N,
H and W are dynamic: any batch, any height and width of at least 32 pixels
(64 for the backbone models), odd sizes included. The model, its class count
its normalisation and its FOV scale (``fov_diameter``: photographs resized so
that their field of view is that many pixels across, 0 for none; ``fov_diameter_max``:
wider ones kept at their own scale up to that many pixels, 0 for none) and
its decision threshold (``vessel_threshold``, ``--threshold``: a vessel
where its probability exceeds it; null for the more likely class) are
stored in the file (ONNX: ``metadata_props``; .pt2:
the extra file ``model.json``), so ``predict.py --weights unet.onnx`` needs
nothing else, and no PyTorch: only numpy, Pillow and onnxruntime.

Needs PyTorch 2.6 or newer. ONNX export needs the optional packages ``onnx``
and ``onnxscript`` (torch.onnx's exporter; ``onnxruntime`` to check the
result): ``pip install -r requirements-extras.txt``.
Before the file is put in place, the exported model is run on an odd-sized
input and compared with PyTorch; a file that disagrees is never written, and
an existing ``--output`` is only replaced by a complete, checked file.
"""
import json
import os
import warnings

from train_utils.cli import EXPORT_FORMATS as FORMATS, export_parser as get_args_parser, weights_or_default

if __name__ == "__main__":  # first, before torch loads: --help and mistyped flags are answered at once
    cli_args = get_args_parser(doc=__doc__).parse_args()

import torch
from torch import nn

import src
from train_utils import extras
from train_utils.checkpoint import load_checkpoint, model_from_checkpoint, normalisation
from train_utils.errors import UserError, run_cli
from train_utils.files import atomic_write, ensure_writable_folder
from train_utils.inference import check_threshold, inference_model

INPUT_NAME, OUTPUT_NAME = "image", "logits"
PT2_META_FILE = "model.json"
# Largest difference from PyTorch accepted by the check, relative to the logits' magnitude (float32 rounding
# differs between runtimes by ~1e-7 of it).
CHECK_TOLERANCE = 1e-4
# Settings that name files of the training machine: a --format pth file leaves them out.
LOCAL_PATH_KEYS = ("data_path", "output_dir", "resume", "pretrained_backbone", "init_weights")


def resolve_format(args, weights):
    """(format, output path) from ``--format`` and ``--output``, which must agree; the output defaults to
    ``weights`` with the format's suffix."""
    fmt, out = args.format, args.output
    if fmt is None:
        if out is None:
            raise UserError("give --format onnx, pt2 or pth (or an --output ending in .onnx, .pt2 or .pth)")
        fmt = next((f for f, ext in FORMATS.items() if out.lower().endswith(ext)), None)
        if fmt is None:
            raise UserError(f"--output '{out}' ends in none of .onnx, .pt2 and .pth; give --format")
    if out is None:
        out = os.path.splitext(weights)[0] + FORMATS[fmt]
    if not out.lower().endswith(FORMATS[fmt]):
        raise UserError(f"--output '{out}' must end in {FORMATS[fmt]} for --format {fmt} "
                        "(predict.py recognises the model by its suffix)")
    if os.path.isdir(out):
        raise UserError(f"--output '{out}' is a folder; give a file name ending in {FORMATS[fmt]}")
    return fmt, out


class LogitsOnly(nn.Module):
    """The segmentation model with its ``{"out": logits}`` dict unwrapped: one named tensor output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        return self.model(image)["out"]


def load_for_export(weights, threshold=None):
    """(eval-mode model with BatchNorm folded, metadata dict) from a train.py checkpoint, as predict.py builds it;
    ``threshold`` replaces the checkpoint's decision threshold."""
    model, ckpt, kwargs = model_from_checkpoint(weights, "export.py exports RGB models")
    mean, std = normalisation(ckpt.get("args", {}))
    net = LogitsOnly(inference_model(model, channels_last=False)).eval()
    # The checkpoint's own ``args`` keys and meanings, so model_kwargs() reads them back unchanged.
    meta = {"model": kwargs["model"], "num_classes": kwargs["num_classes"] - 1, "base_c": kwargs["base_c"],
            "mean": mean, "std": std, "fov_diameter": ckpt.get("args", {}).get("fov_diameter") or 0,
            "fov_diameter_max": ckpt.get("args", {}).get("fov_diameter_max") or 0,
            "vessel_threshold": threshold if threshold is not None else ckpt.get("args", {}).get("vessel_threshold"),
            "epoch": ckpt.get("epoch"), "best_dice": ckpt.get("best_dice"),
            "source": os.path.basename(weights), "input": INPUT_NAME, "output": OUTPUT_NAME,
            "normalisation": "image = (rgb / 255 - mean) / std, float32 [N, 3, H, W]"}
    return net, meta


def example_inputs(model_name):
    """(example batch for tracing, odd-sized batch for the check). The example's batch of 2 and even,
    non-minimal size keep torch.export from specialising any dimension."""
    m = src.model_spec(model_name).min_size  # the deepest feature map >= 2 px: see src.ModelSpec
    return torch.randn(2, 3, 2 * m, 2 * m), torch.randn(1, 3, m + 13, m + 29)


def dynamic_shapes(model_name):
    """torch.export's spec for the one input: batch, height and width are free."""
    m = src.model_spec(model_name).min_size  # the deepest feature map >= 2 px: see src.ModelSpec
    return ({0: torch.export.Dim("batch", min=1, max=1024), 2: torch.export.Dim("height", min=m),
             3: torch.export.Dim("width", min=m)},)


def compare(name, got, expected):
    """Max abs difference of two logit arrays; a ``UserError`` when it exceeds the tolerance."""
    expected = expected.detach().numpy()
    diff = float(abs(got - expected).max())
    scale = max(1.0, float(abs(expected).max()))
    if not diff <= CHECK_TOLERANCE * scale:
        raise UserError(f"the exported model disagrees with PyTorch on a {expected.shape[2]}x{expected.shape[3]} "
                        f"input (max abs difference {diff:.3g}); nothing was written")
    print(f"check: {name} agrees with PyTorch on a {expected.shape[3]}x{expected.shape[2]} input "
          f"(max abs difference {diff:.2g})")
    return diff


def export_onnx(net, meta, tmp, opset, check):
    onnx, _ = extras.require("exporting to ONNX", "onnx", "onnxscript")
    example, probe = example_inputs(meta["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's notes on the graph it specialises, not the user's concern
        program = torch.onnx.export(net, (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], dynamic_shapes=dynamic_shapes(meta["model"]),
                                    opset_version=opset, verbose=False)
    program.save(tmp, external_data=False)
    model = onnx.load(tmp)
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, json.dumps(v)
    model.doc_string = f"U-Net vessel segmentation exported from {meta['source']} by export.py"
    onnx.save(model, tmp)
    if check:
        if not extras.available("onnxruntime"):
            print("check skipped: onnxruntime is not installed (pip install onnxruntime)")
            return
        import onnxruntime as ort

        session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        got = session.run([OUTPUT_NAME], {INPUT_NAME: probe.numpy()})[0]
        with torch.no_grad():
            compare("onnxruntime", got, net(probe))


def export_pt2(net, meta, tmp, check):
    example, probe = example_inputs(meta["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(net, (example,), dynamic_shapes=dynamic_shapes(meta["model"]))
    torch.export.save(program, tmp, extra_files={PT2_META_FILE: json.dumps(meta)})
    if check:
        loaded = torch.export.load(tmp)
        with torch.no_grad():
            compare("torch.export.load", loaded.module()(probe).numpy(), net(probe))


def export_half_checkpoint(weights, tmp, check, threshold=None):
    """A checkpoint of the model alone (no optimiser state, no paths of the training machine), its
    floating-point tensors stored in float16: a quarter of a training checkpoint's size. It loads as any
    checkpoint (into float32 parameters); ``threshold`` is stored as its ``vessel_threshold``. The check
    compares the float16 model's predicted classes with the original's on a random input."""
    ckpt = load_checkpoint(weights)
    state = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    # The folders of the machine it was trained on mean nothing elsewhere (and may name private places).
    args = {k: v for k, v in ckpt["args"].items() if k not in LOCAL_PATH_KEYS}
    if threshold is not None:
        args["vessel_threshold"] = threshold
    torch.save({"model": state, "args": args, "epoch": ckpt.get("epoch"), "best_dice": ckpt.get("best_dice")}, tmp)
    if check:
        original, _, _ = model_from_checkpoint(weights)
        half, _, _ = model_from_checkpoint(tmp)
        _, probe = example_inputs(ckpt["args"].get("model", "unet"))
        with torch.no_grad():
            a, b = original(probe)["out"], half(probe)["out"]
        changed = (a.argmax(1) != b.argmax(1)).float().mean().item()
        print(f"check: float16 storage changes {changed:.4%} of the predicted pixels of a random input "
              f"(max logit difference {(a - b).abs().max().item():.2g})")


def check_torch_version(version=torch.__version__):
    """torch.onnx's torch.export-based exporter and ``ONNXProgram.save`` as used here came with PyTorch 2.6."""
    major, minor = (int(v) for v in version.split("+")[0].split(".")[:2])
    if (major, minor) < (2, 6):
        raise UserError(f"export.py needs PyTorch 2.6 or newer (found {version}): pip install -U torch torchvision")


def main(args):
    check_torch_version()
    weights = weights_or_default(args.weights)
    fmt, out = resolve_format(args, weights)
    check_threshold(args.threshold)
    if fmt == "onnx":  # before the minutes of exporting: is everything installed?
        extras.require("exporting to ONNX", "onnx", "onnxscript")
    ensure_writable_folder(os.path.dirname(os.path.abspath(out)), f"--output '{out}'")
    net, meta = load_for_export(weights, args.threshold)
    print(f"exporting {src.describe(meta['model'], meta['num_classes'] + 1, meta['base_c'])} "
          f"from '{weights}' to {fmt}")
    torch.manual_seed(0)  # the same example and check inputs every time
    # An existing --output is replaced only by a complete file that passed its check.
    if fmt == "onnx":
        atomic_write(out, lambda tmp: export_onnx(net, meta, tmp, args.opset, args.check), suffix=FORMATS[fmt])
    elif fmt == "pt2":
        atomic_write(out, lambda tmp: export_pt2(net, meta, tmp, args.check), suffix=FORMATS[fmt])
    else:
        atomic_write(out, lambda tmp: export_half_checkpoint(weights, tmp, args.check, args.threshold),
                     suffix=FORMATS[fmt])
    size = os.path.getsize(out) / 2 ** 20
    if meta["vessel_threshold"] is not None:
        print(f"predict.py draws a vessel where its probability exceeds {meta['vessel_threshold']:g} "
              "(stored as vessel_threshold)")
    if fmt == "pth":
        print(f"wrote {out} ({size:.1f} MB): the model's weights in float16, loaded as any checkpoint")
        return
    print(f"wrote {out} ({size:.1f} MB): input '{INPUT_NAME}' float32 [N, 3, H, W], normalised with mean "
          f"{meta['mean']} and std {meta['std']}; output '{OUTPUT_NAME}' [N, {meta['num_classes'] + 1}, H, W]")
    if meta["fov_diameter_max"]:
        print(f"the model expects photographs resized so that their field of view is {meta['fov_diameter']} px "
              f"across, or kept at their own scale up to {meta['fov_diameter_max']} px (predict.py --weights does "
              "it; stored in the metadata as fov_diameter and fov_diameter_max)")
    elif meta["fov_diameter"]:
        print(f"the model expects photographs resized so that their field of view is {meta['fov_diameter']} px "
              "across (predict.py --weights does it; stored in the metadata as fov_diameter)")


if __name__ == "__main__":
    run_cli(main, cli_args, debug=cli_args.debug)
