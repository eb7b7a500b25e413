"""torch.hub entry point: the U-Net shipped in ``weights/``, trained on DRIVE, CHASE_DB1, STARE and HRF together.

    import torch
    model = torch.hub.load("path/to/this/repo", "unet_vessels", source="local")
    # model(x)["out"]: logits [N, 2, H, W] for x = (rgb / 255 - model.mean) / model.std, [N, 3, H, W];
    # resize the photograph first so that its field of view is D pixels across, D = its own FOV diameter
    # brought within [model.fov_diameter, model.fov_diameter_max] (train_utils.imaging.working_diameter).

predict.py does all of that (and the FOV estimate, tiling and writing the
masks); docs/model_card.md says what the model was trained on and how well
it does.
"""
dependencies = ["torch", "torchvision", "numpy", "PIL"]


def unet_vessels():
    """The shipped vessel U-Net in evaluation mode (float32, on the CPU), with the input it expects attached:
    ``mean`` and ``std`` (RGB, for images scaled to 0..1), ``fov_diameter`` and ``fov_diameter_max`` (pixels),
    and ``vessel_threshold``: a vessel where 1 - softmax(logits)[:, 0] exceeds it (None: the more likely class)."""
    from train_utils.checkpoint import model_from_checkpoint, normalisation
    from train_utils.cli import SHIPPED_WEIGHTS

    model, ckpt, _ = model_from_checkpoint(SHIPPED_WEIGHTS, "the shipped model reads RGB photographs")
    saved = ckpt.get("args", {})
    model.mean, model.std = normalisation(saved)
    model.fov_diameter = int(saved.get("fov_diameter") or 0)
    model.fov_diameter_max = int(saved.get("fov_diameter_max") or 0)
    model.vessel_threshold = saved.get("vessel_threshold")
    return model.eval()
