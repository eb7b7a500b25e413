"""The tutorial's engine API: its imports from ``train_utils``, ``train_one_epoch`` called as its train.py calls
it, and ``evaluate`` against a plain per-image loop."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_utils
from my_dataset import DriveDataset
from src import UNet
from tests.conftest import ROOT
from tests.test_evaluation import CPU, loader_of, loop_confusion, loop_dice, tiny_model
from train_utils import create_lr_scheduler, evaluate, train_one_epoch
from train_utils.evaluation import validate
from train_utils.inference import inference_model
from train_utils.metrics import ConfusionMatrix
from train_utils.train_and_eval import model_num_classes
from train_utils.transforms import DRIVE_MEAN, DRIVE_STD


def tutorial_eval_transform(img, target):
    """The tutorial's eval preset (its transforms.py: ToTensor, Normalize) on DriveDataset's PIL pair."""
    from torchvision.transforms import functional as TF
    img = TF.normalize(TF.to_tensor(img), mean=DRIVE_MEAN, std=DRIVE_STD)
    return img, torch.as_tensor(np.array(target), dtype=torch.int64)

TUTORIAL_NAMES = ["train_one_epoch", "evaluate", "create_lr_scheduler", "init_distributed_mode", "save_on_master",
                  "mkdir"]


def test_the_tutorials_imports_work_and_load_torch_only_when_used():
    code = ("import sys, train_utils, train_utils.allocator\n"
            "assert 'torch' not in sys.modules, 'importing the package loaded torch'\n"
            "from train_utils import train_one_epoch, evaluate, create_lr_scheduler\n"
            "from train_utils import init_distributed_mode, save_on_master, mkdir\n"
            "import train_utils.distributed_utils as utils\n"
            "print(utils.ConfusionMatrix.__name__, utils.DiceCoefficient.__name__, utils.MetricLogger.__name__,\n"
            "      train_one_epoch.__module__, mkdir.__module__)\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ConfusionMatrix", "DiceCoefficient", "MetricLogger", "train_utils.train_and_eval",
                                "train_utils.distributed_utils"]
    assert sorted(train_utils.__all__) == sorted(TUTORIAL_NAMES)
    with pytest.raises(AttributeError, match="no_such_name"):
        train_utils.no_such_name  # noqa: B018


@pytest.fixture(scope="module")
def train_loader(drive_root):
    """The 4 training images whole, in order, 2 per batch: the same batches on every pass."""
    dataset = DriveDataset(drive_root, train=True, transforms=tutorial_eval_transform)
    return loader_of(dataset, batch_size=2)


@pytest.fixture(scope="module")
def initial_state():
    torch.manual_seed(0)
    return UNet(in_channels=3, num_classes=2, base_c=4).state_dict()


def one_epoch(state, loader, epoch=0, **kwargs):
    """A fresh model from ``state``, the tutorial's optimiser and schedule, and one ``train_one_epoch`` called as
    the tutorial's train.py calls it, plus ``kwargs``; returns ((mean loss, lr), the trained weights)."""
    model = UNet(in_channels=3, num_classes=2, base_c=4)
    model.load_state_dict(state)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                                weight_decay=1e-4)
    lr_scheduler = create_lr_scheduler(optimizer, len(loader), 2, warmup=True)
    kwargs.setdefault("scaler", None)
    result = train_one_epoch(model, optimizer, loader, CPU, epoch, lr_scheduler=lr_scheduler, print_freq=10,
                             **kwargs)
    return result, model.state_dict()


def test_train_one_epoch_called_as_the_tutorial_calls_it(train_loader, initial_state, capsys):
    (mean_loss, lr), weights = one_epoch(initial_state, train_loader, epoch=3)
    assert isinstance(mean_loss, float) and 0 < mean_loss < 5
    assert lr == pytest.approx(0.01 * (1e-3 + (1 - 1e-3) * 2 / 2))  # after the warm-up epoch's 2 steps
    assert "Epoch: [3]" in capsys.readouterr().out
    # The class count read from the model is the one train.py names.
    (explicit_loss, explicit_lr), explicit_weights = one_epoch(initial_state, train_loader, epoch=3, num_classes=2)
    assert (explicit_loss, explicit_lr) == (mean_loss, lr)
    assert all(torch.equal(weights[k], explicit_weights[k]) for k in weights)


def test_num_classes_is_read_through_the_wrappers():
    model = UNet(in_channels=3, num_classes=3, base_c=4)
    assert model_num_classes(model) == 3
    # DataParallel's .module, as DDP's; torch.compile's ._orig_mod (nothing is compiled before a forward pass).
    assert model_num_classes(torch.nn.DataParallel(model)) == 3
    assert model_num_classes(torch.compile(torch.nn.DataParallel(model))) == 3
    with pytest.raises(TypeError, match="pass num_classes="):
        model_num_classes(torch.nn.Linear(2, 2))


# GradScaler skips a step whose float16 gradients overflowed (its first, at its initial scale), and torch warns.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_a_scaler_turns_on_float16_autocast_as_in_the_tutorial(train_loader, initial_state):
    (fp32, _), _ = one_epoch(initial_state, train_loader)
    (scaled, _), _ = one_epoch(initial_state, train_loader, scaler=torch.amp.GradScaler("cpu"))
    (explicit, _), _ = one_epoch(initial_state, train_loader, scaler=torch.amp.GradScaler("cpu"),
                                 amp_dtype=torch.float16)
    assert scaled == explicit != fp32
    # train.py's float32 run: a disabled scaler and no amp_dtype is float32.
    (disabled, _), _ = one_epoch(initial_state, train_loader, scaler=torch.amp.GradScaler("cpu", enabled=False))
    assert disabled == fp32


@pytest.fixture(scope="module")
def test_set(drive_root):
    return DriveDataset(drive_root, train=False, transforms=tutorial_eval_transform)


def test_evaluate_is_the_tutorials_plain_loop(test_set):
    model = tiny_model(torch.stack([test_set[i][0] for i in range(len(test_set))]))
    confmat, dice = evaluate(model, loader_of(test_set), CPU, 2)
    assert isinstance(confmat, ConfusionMatrix) and isinstance(dice, float)
    with torch.no_grad():
        preds = [model(test_set[i][0][None])["out"][0].argmax(0) for i in range(len(test_set))]
    targets = [test_set[i][1] for i in range(len(test_set))]
    assert dice == pytest.approx(np.mean([loop_dice(p, t, 2) for p, t in zip(preds, targets)]), abs=1e-6)
    assert np.array_equal(confmat.mat.numpy(), sum(loop_confusion(p, t, 2) for p, t in zip(preds, targets)))
    # validate scores the same on its BatchNorm-folded copy: equal up to the folding's rounding, and exactly
    # when evaluate is given that copy.
    result = validate(model, loader_of(test_set), CPU, 2, channels_last=False)
    assert dice == pytest.approx(result.dice, abs=1e-6)
    folded_confmat, folded_dice = evaluate(inference_model(model, channels_last=False), loader_of(test_set), CPU, 2)
    assert folded_dice == result.dice and torch.equal(folded_confmat.mat, result.confmat.mat)
    assert evaluate(model, loader_of(test_set, batch_size=2), CPU, 2)[1] == pytest.approx(dice, abs=1e-6)
