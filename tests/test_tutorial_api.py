"""The tutorial's API, called exactly as the tutorial calls it.

Each call marked "the tutorial's call" is written out from the tutorial's final
``train.py`` and ``train_multi_GPU.py``, positions and keywords as they are there;
the ``utils.*`` meters and metrics are called as its ``train_utils/train_and_eval.py``
calls them. A user who keeps those files and takes this project's ``src/``,
``train_utils/`` and ``my_dataset.py`` makes exactly these calls. Values are
checked against plain loops written from the tutorial's formulas.
"""
import argparse
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train_utils
import train_utils.distributed_utils as utils
from my_dataset import DriveDataset
from src import UNet
from tests.conftest import ROOT
from tests.test_evaluation import loop_confusion, loop_dice, tiny_model
from tests.test_losses import loop_build_target, loop_multiclass
from train_utils import create_lr_scheduler, evaluate, init_distributed_mode, mkdir, save_on_master, train_one_epoch
from train_utils.checkpoint import load_checkpoint
from train_utils.evaluation import validate
from train_utils.inference import inference_model
from train_utils.train_and_eval import criterion
from train_utils.transforms import get_transform

TUTORIAL_NAMES = ["train_one_epoch", "evaluate", "create_lr_scheduler", "init_distributed_mode", "save_on_master",
                  "mkdir"]
# The tutorial's normalisation, written into both of its scripts.
mean = (0.709, 0.381, 0.224)
std = (0.127, 0.079, 0.043)


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


@pytest.fixture
def args(drive_root):
    """The tutorial's train.py arguments (its defaults, on the CPU, 2 epochs of batch 2)."""
    return argparse.Namespace(data_path=drive_root, num_classes=1, device="cpu", batch_size=2, epochs=2, lr=0.01,
                              momentum=0.9, weight_decay=1e-4, print_freq=1, resume="", start_epoch=0,
                              save_best=True, amp=False)


def tutorial_data(args):
    """The tutorial's datasets and loaders, built by its calls (single-process workers: the loader is not the
    API under test)."""
    train_dataset = DriveDataset(args.data_path,
                                 train=True,
                                 transforms=get_transform(train=True, mean=mean, std=std))

    val_dataset = DriveDataset(args.data_path,
                               train=False,
                               transforms=get_transform(train=False, mean=mean, std=std))
    train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=args.batch_size, num_workers=0,
                                               shuffle=True, collate_fn=train_dataset.collate_fn)
    val_loader = torch.utils.data.DataLoader(val_dataset, batch_size=1, num_workers=0,
                                             collate_fn=val_dataset.collate_fn)
    return train_loader, val_loader


def tutorial_model_and_optimiser(args, num_classes, seed=0):
    """The tutorial's model (at width 4, for speed), optimiser and schedule."""
    torch.manual_seed(seed)
    model = UNet(in_channels=3, num_classes=num_classes, base_c=4)
    params_to_optimize = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params_to_optimize,
        lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    return model, optimizer


def plain_epoch(model, optimizer, loader, lr_scheduler, num_classes):
    """One epoch written from the tutorial's steps: forward, the weighted loss, zero_grad, backward, SGD step,
    per-step schedule; returns (mean loss, last lr)."""
    model.train()
    weight = torch.tensor([1.0, 2.0]) if num_classes == 2 else None
    losses = []
    for image, target in loader:
        loss = criterion(model(image), target, weight, num_classes=num_classes, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        losses.append(loss.item())
    return sum(losses) / len(losses), optimizer.param_groups[0]["lr"]


def test_train_one_epoch_as_the_tutorials_scripts_call_it(args, capsys):
    device = torch.device(args.device)
    num_classes = args.num_classes + 1
    scaler = None  # the tutorial's: torch.cuda.amp.GradScaler() if args.amp else None, with --amp off
    train_loader, _ = tutorial_data(args)
    train_data_loader = train_loader  # train_multi_GPU.py's name for it

    model, optimizer = tutorial_model_and_optimiser(args, num_classes)
    lr_scheduler = create_lr_scheduler(optimizer, len(train_loader), args.epochs, warmup=True)
    results = []
    for epoch in range(args.start_epoch, args.epochs):
        torch.manual_seed(epoch)  # the same shuffle and crops for the plain loop below
        if epoch == 0:  # the tutorial's call in train.py
            mean_loss, lr = train_one_epoch(model, optimizer, train_loader, device, epoch, num_classes,
                                            lr_scheduler=lr_scheduler, print_freq=args.print_freq, scaler=scaler)
        else:  # the tutorial's call in train_multi_GPU.py
            mean_loss, lr = train_one_epoch(model, optimizer, train_data_loader, device, epoch, num_classes,
                                            lr_scheduler=lr_scheduler, print_freq=args.print_freq, scaler=scaler)
        results.append((mean_loss, lr))
    out = capsys.readouterr().out
    assert "Epoch: [0]" in out and "Epoch: [1]" in out

    plain, plain_optimizer = tutorial_model_and_optimiser(args, num_classes)
    plain_scheduler = create_lr_scheduler(plain_optimizer, len(train_loader), args.epochs, warmup=True)
    expected = []
    for epoch in range(args.start_epoch, args.epochs):
        torch.manual_seed(epoch)
        expected.append(plain_epoch(plain, plain_optimizer, train_loader, plain_scheduler, num_classes))
    for (loss, lr), (plain_loss, plain_lr) in zip(results, expected):
        assert isinstance(loss, float) and isinstance(lr, float)
        assert loss == pytest.approx(plain_loss, rel=1e-5) and lr == pytest.approx(plain_lr, rel=1e-12)
    # After the warm-up epoch's 2 steps the factor is 1; after the last step (1 - 1) ** 0.9 = 0.
    assert results[0][1] == pytest.approx(0.01) and results[1][1] == pytest.approx(0.0, abs=1e-12)
    trained, reference = model.state_dict(), plain.state_dict()
    for k in trained:
        torch.testing.assert_close(trained[k], reference[k], rtol=1e-4, atol=1e-6)


# GradScaler skips a step whose float16 gradients overflowed (its first, at its initial scale), and torch warns.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_a_scaler_turns_on_float16_autocast_as_in_the_tutorial(args):
    device = torch.device(args.device)
    num_classes = args.num_classes + 1
    train_loader, _ = tutorial_data(args)

    def one_epoch(scaler, **extras):
        model, optimizer = tutorial_model_and_optimiser(args, num_classes)
        lr_scheduler = create_lr_scheduler(optimizer, len(train_loader), args.epochs, warmup=True)
        torch.manual_seed(0)
        return train_one_epoch(model, optimizer, train_loader, device, 0, num_classes,
                               lr_scheduler=lr_scheduler, print_freq=args.print_freq, scaler=scaler, **extras)[0]

    fp32 = one_epoch(None)
    scaled = one_epoch(torch.amp.GradScaler("cpu"))
    assert scaled == one_epoch(torch.amp.GradScaler("cpu"), amp_dtype=torch.float16) != fp32
    # train.py's float32 run: a disabled scaler and no amp_dtype is float32.
    assert one_epoch(torch.amp.GradScaler("cpu", enabled=False)) == fp32


def test_evaluate_as_the_tutorials_scripts_call_it(args, capsys):
    device = torch.device(args.device)
    num_classes = args.num_classes + 1
    _, val_loader = tutorial_data(args)
    val_data_loader = val_loader  # train_multi_GPU.py's name for it
    val_set = val_loader.dataset
    model = tiny_model(torch.stack([val_set[i][0] for i in range(len(val_set))]))

    confmat, dice = evaluate(model, val_loader, device=device, num_classes=num_classes)  # the tutorial's call
    val_info = str(confmat)
    print(val_info)
    print(f"dice coefficient: {dice:.3f}")
    assert isinstance(dice, float)
    with torch.no_grad():
        preds = [model(val_set[i][0][None])["out"][0].argmax(0) for i in range(len(val_set))]
    targets = [val_set[i][1] for i in range(len(val_set))]
    assert dice == pytest.approx(np.mean([loop_dice(p, t, 2) for p, t in zip(preds, targets)]), abs=1e-6)
    mat = sum(loop_confusion(p, t, 2) for p, t in zip(preds, targets))
    assert np.array_equal(confmat.mat.numpy(), mat)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-5] == f"global correct: {100 * np.trace(mat) / mat.sum():.1f}"
    assert lines[-2].startswith("mean IoU: ") and lines[-1] == f"dice coefficient: {dice:.3f}"
    # train_multi_GPU.py's call gives the same.
    confmat, dice_mg = evaluate(model, val_data_loader, device=device, num_classes=num_classes)
    assert dice_mg == dice

    # validate (train.py's) scores the same on its BatchNorm-folded copy: equal up to the folding's rounding,
    # and exactly when evaluate is given that copy.
    result = validate(model, val_loader, device, num_classes, channels_last=False)
    assert dice == pytest.approx(result.dice, abs=1e-6)
    folded_confmat, folded_dice = evaluate(inference_model(model, channels_last=False), val_loader, device, 2)
    assert folded_dice == result.dice and torch.equal(folded_confmat.mat, result.confmat.mat)


def evaluate_as_the_tutorial_writes_it(model, data_loader, device, num_classes):
    """The tutorial's evaluate, its ``utils.*`` calls as its train_and_eval.py writes them, on this project's
    ``utils``."""
    model.eval()
    confmat = utils.ConfusionMatrix(num_classes)
    dice = utils.DiceCoefficient(num_classes=num_classes, ignore_index=255)
    metric_logger = utils.MetricLogger(delimiter="  ")
    header = 'Test:'
    with torch.no_grad():
        for image, target in metric_logger.log_every(data_loader, 100, header):
            image, target = image.to(device), target.to(device)
            output = model(image)
            output = output['out']

            confmat.update(target.flatten(), output.argmax(1).flatten())
            dice.update(output, target)

        confmat.reduce_from_all_processes()
        dice.reduce_from_all_processes()

    return confmat, dice.value.item()


def test_the_tutorials_utils_calls(args):
    device = torch.device(args.device)
    num_classes = args.num_classes + 1
    _, val_loader = tutorial_data(args)
    val_set = val_loader.dataset
    model = tiny_model(torch.stack([val_set[i][0] for i in range(len(val_set))]))
    confmat, dice = evaluate_as_the_tutorial_writes_it(model, val_loader, device, num_classes)
    ours_confmat, ours_dice = evaluate(model, val_loader, device, num_classes)
    assert dice == ours_dice and torch.equal(confmat.mat, ours_confmat.mat) and str(confmat) == str(ours_confmat)

    # The training loop's meters: the lr meter of window 1, loss as a float, the global average returned.
    metric_logger = utils.MetricLogger(delimiter="  ")
    metric_logger.add_meter('lr', utils.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    losses = [torch.tensor(0.5), torch.tensor(0.25), torch.tensor(2.0)]
    for step, loss in enumerate(metric_logger.log_every(losses, 2, None)):
        lr = 0.01 / (step + 1)
        metric_logger.update(loss=loss.item(), lr=lr)
    assert metric_logger.meters["loss"].global_avg == pytest.approx((0.5 + 0.25 + 2.0) / 3)
    assert str(metric_logger.meters["lr"]) == f"{0.01 / 3:.6f}"
    # reset and the dice value after it (the tutorial's DiceCoefficient.reset called a zeros_ that does not exist)
    metric = utils.DiceCoefficient(num_classes=num_classes, ignore_index=255)
    metric.update(torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.int64))
    metric.reset()
    confmat.reset()
    assert metric.value.item() == 0 and confmat.mat.sum() == 0


def tutorial_lr_factor(x, num_step, epochs, warmup_epochs=1, warmup_factor=1e-3):
    """The tutorial's LR factor at step x, written from its formula."""
    if x <= warmup_epochs * num_step:
        alpha = x / (warmup_epochs * num_step)
        return warmup_factor * (1 - alpha) + alpha
    return (1 - (x - warmup_epochs * num_step) / ((epochs - warmup_epochs) * num_step)) ** 0.9


@pytest.mark.parametrize("extras", [{}, {"warmup_epochs": 2, "warmup_factor": 0.1}])
def test_create_lr_scheduler_as_the_tutorial_calls_it(args, extras):
    train_loader = train_data_loader = list(range(5))  # only its length counts: 5 steps per epoch
    args.epochs = 4
    for name in ("train.py", "train_multi_GPU.py"):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)
        if name == "train.py":
            lr_scheduler = create_lr_scheduler(optimizer, len(train_loader), args.epochs, warmup=True, **extras)
        else:
            lr_scheduler = create_lr_scheduler(optimizer, len(train_data_loader), args.epochs, warmup=True,
                                               **extras)
        lrs = []
        for _ in range(args.epochs * len(train_loader)):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            lr_scheduler.step()
        expected = [args.lr * tutorial_lr_factor(x, 5, args.epochs, **extras) for x in range(len(lrs))]
        assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("aux", [False, True])
def test_criterion_as_the_tutorial_calls_it(aux):
    gen = torch.Generator().manual_seed(3)
    num_classes = 2
    target = torch.randint(0, 2, (2, 9, 7), generator=gen)
    target = torch.where(torch.rand(2, 9, 7, generator=gen) < 0.3, 255, target)
    output = {"out": torch.randn(2, 2, 9, 7, generator=gen)}
    if aux:
        output["aux"] = torch.randn(2, 2, 9, 7, generator=gen)
    loss_weight = torch.as_tensor([1.0, 2.0], device="cpu")
    loss = criterion(output, target, loss_weight, num_classes=num_classes, ignore_index=255)  # the tutorial's call

    def loop_loss(x):
        # weighted cross-entropy over the pixels that are not 255: sum of w[t] * -log p[t] over sum of w[t]
        num = den = 0.0
        logp = torch.log_softmax(x.double(), dim=1)
        for i in range(x.shape[0]):
            for yy in range(x.shape[2]):
                for xx in range(x.shape[3]):
                    t = int(target[i, yy, xx])
                    if t != 255:
                        num -= float(loss_weight[t]) * float(logp[i, t, yy, xx])
                        den += float(loss_weight[t])
        dice = loop_multiclass(F.softmax(x.double(), dim=1), loop_build_target(target, 2, 255).double(), 255)
        return num / den + 1 - dice

    expected = loop_loss(output["out"]) + (0.5 * loop_loss(output["aux"]) if aux else 0.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_drive_dataset_as_the_tutorial_builds_it(args):
    train_loader, val_loader = tutorial_data(args)
    train_dataset, val_dataset = train_loader.dataset, val_loader.dataset
    assert (train_dataset.flag, val_dataset.flag) == ("training", "test")
    assert [len(train_dataset.img_list), len(train_dataset.manual), len(train_dataset.roi_mask)] == [4, 4, 4]
    torch.manual_seed(0)
    images, targets = next(iter(train_loader))
    # The training crop is the tutorial's 480, padded with 0 / 255 from a small image.
    assert images.shape == (2, 3, 480, 480) and images.dtype == torch.float32
    assert targets.shape == (2, 480, 480) and targets.dtype == torch.int64
    assert set(targets.unique().tolist()) <= {0, 1, 255}
    # The validation item, from the files by the tutorial's formulas: the image to [0, 1] and normalised; the
    # target manual / 255 inside the FOV and 255 outside it.
    for i in range(len(val_dataset)):
        image, target = val_dataset[i]
        rgb = np.asarray(Image.open(val_dataset.img_list[i]).convert("RGB"), dtype=np.float64) / 255
        expected = (rgb - np.array(mean)) / np.array(std)
        np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), expected, atol=1e-5)
        manual = np.asarray(Image.open(val_dataset.manual[i]).convert("L")) / 255
        roi_mask = 255 - np.asarray(Image.open(val_dataset.roi_mask[i]).convert("L"), dtype=np.float64)
        assert np.array_equal(target.numpy(), np.clip(manual + roi_mask, 0, 255).astype(np.int64))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_init_distributed_mode_save_on_master_and_mkdir_as_the_tutorial_calls_them(args, tmp_path):
    args.output_dir, args.dist_url, args.world_size = str(tmp_path / "multi_train"), "env://", 1
    if args.output_dir:
        mkdir(args.output_dir)
    mkdir(args.output_dir)  # an existing folder is fine
    init_distributed_mode(args)
    assert args.distributed is False and args.rank in [-1, 0]

    num_classes = args.num_classes + 1
    model, optimizer = tutorial_model_and_optimiser(args, num_classes)
    model_without_ddp = model
    lr_scheduler = create_lr_scheduler(optimizer, 2, args.epochs, warmup=True)
    epoch = 0
    save_file = {'model': model_without_ddp.state_dict(),
                 'optimizer': optimizer.state_dict(),
                 'lr_scheduler': lr_scheduler.state_dict(),
                 'args': args,
                 'epoch': epoch}
    save_on_master(save_file,
                   os.path.join(args.output_dir, 'best_model.pth'))
    loaded = load_checkpoint(os.path.join(args.output_dir, 'best_model.pth'))
    assert loaded["epoch"] == 0 and loaded["args"]["num_classes"] == 1
    assert all(torch.equal(v, loaded["model"][k]) for k, v in model.state_dict().items())

    # Under torchrun (here one process of one, on the CPU): the process group starts on gloo, and the
    # tutorial's rank, local GPU index and flag are set.
    code = ("import argparse\n"
            "from train_utils import init_distributed_mode, save_on_master\n"
            "args = argparse.Namespace(device='cpu', dist_url='env://', world_size=1)\n"
            "init_distributed_mode(args)\n"
            "save_on_master({'epoch': 3}, 'ckpt.pth')\n"
            "print(args.distributed, args.rank, args.gpu, args.dist_backend, flush=True)\n")
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "True 0 0 gloo"
    assert torch.load(tmp_path / "ckpt.pth") == {"epoch": 3}
