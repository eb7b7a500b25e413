"""The photographs the shipped models (weights/unet_vessels.pth, weights/unet_av.pth, docs/model_card.md)
never trained on: what the benchmarks score them on by default."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from my_dataset import dataset_files  # noqa: E402
from train_utils.errors import UserError  # noqa: E402
from train_utils.imaging import stem_of  # noqa: E402

# What it trained on, by image stem: the training images of each dataset less those held out for validation
# (DRIVE 36-40, CHASE_DB1 03R 05R 06R 08L, STARE im0003 im0005 im0044 im0081, HRF 01_h 01_g 01_dr).
CHASE_HELD_OUT = ("Image_03R", "Image_05R", "Image_06R", "Image_08L")
TRAINED_ON = {
    "drive": {f"{n}_training" for n in range(21, 36)},
    "chase_db1": {f"Image_{n:02d}{side}" for n in range(1, 11) for side in "LR"} - set(CHASE_HELD_OUT),
    "stare": {"im0001", "im0002", "im0004", "im0077", "im0082", "im0139"},
    "hrf": {f"{n:02d}_{kind}" for n in range(2, 6) for kind in ("h", "g", "dr")},
}
# The artery/vein model (weights/unet_av.pth) trained on the same DRIVE and HRF photographs.
TRAINED_ON["drive_av"], TRAINED_ON["hrf_av"] = TRAINED_ON["drive"], TRAINED_ON["hrf"]


def held_out_samples(name, root, stems=None):
    """The dataset's samples (both splits) to score: ``stems``, else those the shipped model never saw."""
    samples = dataset_files(name, root, "training") + dataset_files(name, root, "test")
    chosen = [s for s in samples if (stem_of(s.image) in stems if stems else stem_of(s.image) not in TRAINED_ON[name])]
    if not chosen:
        raise UserError(f"no held-out photographs in {name} '{root}'")
    return chosen
