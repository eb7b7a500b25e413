"""torch.hub entry points: the U-Nets shipped in ``weights/``: ``unet_vessels``, trained on DRIVE, CHASE_DB1,
STARE and HRF together, and ``unet_av``, arteries and veins, trained on DRIVE and HRF.

    import torch
    model = torch.hub.load("path/to/this/repo", "unet_vessels", source="local")
    av = torch.hub.load("path/to/this/repo", "unet_av", source="local")  # logits [N, 3, H, W]: bg, artery, vein
    # model(x)["out"]: logits [N, 2, H, W] for x = (rgb / 255 - model.mean) / model.std, [N, 3, H, W];
    # resize the photograph first so that its field of view is D pixels across, D = its own FOV diameter
    # brought within [model.fov_diameter, model.fov_diameter_max] (train_utils.imaging.working_diameter).

predict.py does all of that (and the FOV estimate, tiling and writing the
masks); docs/model_card.md says what the model was trained on and how well
it does.
"""
dependencies = ["torch", "torchvision", "numpy", "PIL"]


def _shipped(path):
    """A shipped model in evaluation mode (float32, on the CPU) with the input it expects attached."""
    from train_utils.checkpoint import model_from_checkpoint, normalisation

    model, ckpt, _ = model_from_checkpoint(path, "the shipped model reads RGB photographs")
    saved = ckpt.get("args", {})
    model.mean, model.std = normalisation(saved)
    model.fov_diameter = int(saved.get("fov_diameter") or 0)
    model.fov_diameter_max = int(saved.get("fov_diameter_max") or 0)
    model.vessel_threshold = saved.get("vessel_threshold")
    return model.eval()


def unet_vessels():
    """The shipped vessel U-Net in evaluation mode (float32, on the CPU), with the input it expects attached:
    ``mean`` and ``std`` (RGB, for images scaled to 0..1), ``fov_diameter`` and ``fov_diameter_max`` (pixels),
    and ``vessel_threshold``: a vessel where 1 - softmax(logits)[:, 0] exceeds it (None: the more likely class)."""
    from train_utils.cli import SHIPPED_WEIGHTS
    return _shipped(SHIPPED_WEIGHTS)


def unet_av():
    """The shipped artery/vein U-Net, as ``unet_vessels``: logits of background, artery and vein; a vessel where
    1 - softmax(logits)[:, 0] exceeds ``vessel_threshold``, an artery or a vein as the more likely of the two."""
    from train_utils.cli import SHIPPED_AV_WEIGHTS
    return _shipped(SHIPPED_AV_WEIGHTS)
