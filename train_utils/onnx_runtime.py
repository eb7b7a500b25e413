"""Run a model exported by ``export.py --format onnx`` with onnxruntime, where predict.py runs a checkpoint.

``OnnxModel`` looks like the PyTorch model to ``predict_probabilities``: it is
called with a normalised float batch and returns ``{"out": logits}``, and its
one (empty) parameter tells where tensors live: the CPU, since the session
runs on onnxruntime's CPU provider. The model's name, classes and
normalisation come from the file's metadata, which ``export.py`` writes.
"""
import json
import os

import torch
from torch import nn

from .checkpoint import model_kwargs
from .errors import UserError
from .extras import require

REQUIRED_META = ("model", "num_classes", "mean", "std")


class OnnxModel(nn.Module):
    """An onnxruntime session behind the ``model(x)["out"]`` interface of this project's models."""

    def __init__(self, path):
        super().__init__()
        if not os.path.isfile(path):
            raise UserError(f"ONNX model '{path}' not found")
        ort = require("running an .onnx model", "onnxruntime")
        try:
            self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own kinds for missing and corrupt files
            raise UserError(f"cannot load ONNX model '{path}': {' '.join(str(e).split())[:300]}") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise UserError(f"'{path}' is not a segmentation model of this project (it has {len(inputs)} inputs)")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.meta = {k: json.loads(v) for k, v in meta.items()}
        except ValueError:
            self.meta = {}
        missing = [k for k in REQUIRED_META if k not in self.meta]
        if missing:
            raise UserError(f"'{path}' lacks the metadata export.py writes ({', '.join(missing)}); "
                            "export the checkpoint with export.py")
        # predict_probabilities reads the device from the model's first parameter.
        self.device_anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, x):
        logits = self.session.run([self.output_name], {self.input_name: x.detach().float().contiguous().numpy()})[0]
        return {"out": torch.from_numpy(logits)}


def load_onnx_model(path, device=None, amp=False):
    """(model, the checkpoint-style ``args`` dict, ``src.build_model`` kwargs, device) for predict.py."""
    if device not in (None, "cpu"):
        raise UserError(f"--device {device}: an .onnx model runs on the CPU here (onnxruntime's CPU provider); "
                        "predict with the .pth checkpoint to use a GPU")
    if amp:
        raise UserError("--amp applies to PyTorch checkpoints, not to an .onnx model (it runs in float32)")
    model = OnnxModel(path)
    return model, model.meta, model_kwargs(model.meta), torch.device("cpu")
