"""Training recipes (``--recipe``): named sets of defaults for train.py, and the pieces only a recipe switches on.

``tutorial`` is the tutorial's run and sets nothing. ``fast`` trains with
AdamW and a cosine schedule on more, smaller, more varied crops in small
batches (many short steps), in mixed precision where that is faster,
validates rarely and averages flips at evaluation. It aims at the tutorial's
200-epoch dice (about 0.80) in the wall time of 25 tutorial epochs; README,
"Fast recipe", has what it reaches. Its
choices are standard ones (AdamW at 2e-3 with PyTorch's default weight decay,
cosine to 0), and its width and length are set by that time budget, not tuned
to a test set.
"""
import torch
from torch import nn
from torch.utils.data import Dataset

from .inference import _forward_probs

RECIPES = {
    "tutorial": {},
    # base_c None: fast_width() decides once the precision is known.
    "fast": dict(base_c=None, opt="adamw", lr=2e-3, weight_decay=1e-2, lr_schedule="cosine",
                 crop_size=256, batch_size=4, crops_per_image=4, rotate=90.0, color_jitter=0.2,
                 eval_tta=True, eval_every=10, epochs=50, amp="auto"),
}

# Settings a checkpoint hands on to ``--resume`` / ``--test-only`` when not typed again: everything a recipe
# decides (and the scale range, the other augmentation setting), so a fast run resumes as a fast run and is
# evaluated with its flip averaging.
RUN_KEYS = ("recipe",) + tuple(sorted({k for r in RECIPES.values() for k in r} - {"base_c"} | {"scale_range"}))


def fast_width(amp_dtype):
    """``--recipe fast``'s U-Net width at this precision, for 50 epochs inside the time of 25 tutorial epochs
    (0.80x and 0.97x in two measured runs; README, "Fast recipe"): the tutorial's 32 where mixed precision
    runs (a GPU, or a CPU with bfloat16 hardware, where its step takes about as long as a float32 step at
    width 16), 16 in float32, where 32 would take about twice the time."""
    return 32 if amp_dtype is not None else 16


def build_optimizer(params, opt, lr, momentum, weight_decay):
    """SGD with momentum (the tutorial's) or AdamW (decoupled weight decay)."""
    if opt == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


class RepeatDataset(Dataset):
    """``dataset`` seen ``times`` times per epoch (index i is item i % len): each visit draws its own random
    crop, so an epoch of small crops still covers every image several times. Works under any sampler."""

    def __init__(self, dataset, times):
        self.dataset = dataset
        self.times = times

    def __len__(self):
        return len(self.dataset) * self.times

    def __getitem__(self, index):
        return self.dataset[index % len(self.dataset)]

    def __getattr__(self, name):  # collate_fn, images, ...: the wrapped dataset's
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class FlipAverage(nn.Module):
    """Evaluation with flip averaging: the mean softmax over the image, its horizontal and its vertical flip.

    Returns ``{"out": log(mean probability)}``: its argmax and softmax are those of the averaged
    probabilities, so the dice, the confusion matrix and the AUC all score the averaged prediction,
    exactly as ``predict.py --tta`` computes it.
    """

    def __init__(self, model, channels_last=False):
        super().__init__()
        self.model = model
        self.channels_last = channels_last

    def forward(self, x):
        probs = _forward_probs(self.model, x, tta=True, channels_last=self.channels_last)
        return {"out": probs.clamp_min(1e-30).log()}
