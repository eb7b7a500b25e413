"""Train the U-Net on DRIVE (or CHASE_DB1, STARE, HRF, a folder) on one process (CPU or one GPU);
``train_multi_GPU.py`` runs the same loop under DDP.

    python train.py --demo                                   # synthetic sample, CPU-sized, end to end
    python train.py --data-path /data --num-classes 1 --epochs 200
    python train.py --dataset chase_db1 --data-path CHASEDB1 --val-split 4      # validate on 4 held-out images
    python train.py --data-path /data --resume save_weights/checkpoint.pth   # continue
    python train.py --data-path /data --test-only --resume save_weights/best_model.pth
    python train.py --data-path /data --recipe fast          # shorter run: AdamW, small crops, AMP
"""
import argparse
import csv
import datetime
import json
import math
import os
import random
import time

from train_utils.allocator import use_fast_allocator

if __name__ == "__main__":  # first, before torch loads: run again with a fast allocator (train_utils/allocator.py)
    use_fast_allocator()

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

import src
from my_dataset import DATASETS, VesselDataset, dataset_files, holdout
from train_utils import distributed_utils as utils
from train_utils import visuals
from train_utils.checkpoint import (CARRIED_KEYS, adopt_checkpoint_args, load_checkpoint, plain_args, resume,
                                    safe_load, save_epoch)
from train_utils.errors import UserError, run_cli
from train_utils.files import atomic_write, ensure_writable_folder
from train_utils.imaging import FOV_MODES
from train_utils.inference import inference_model
from train_utils.recipes import RECIPES, RUN_KEYS, FlipAverage, RepeatDataset, build_optimizer, fast_width
from train_utils.synthetic import ensure_synthetic_drive
from train_utils.train_and_eval import autocast_dtype, create_lr_scheduler, evaluate, train_one_epoch
from train_utils.transforms import BASE_SIZE, CROP_SIZE, DRIVE_MEAN, DRIVE_STD, SCALE_RANGE, get_transform
from train_utils.metrics import VesselMetrics, format_metrics

# ``--demo``: a run small enough for a laptop CPU that still learns the synthetic vessels.
# Flags given on the command line win over these.
DEMO_DEFAULTS = dict(data_path="data/synthetic", output_dir="save_weights/demo", epochs=30, crop_size=96,
                     base_size=128, base_c=16, batch_size=4, print_freq=5, device="cpu", seed=0)
DEMO_DATA = dict(num_train=20, num_test=5, height=128, width=124, seed=0)
# What a resumed run also takes from its checkpoint: the held-out validation images stay the same.
RESUMED_KEYS = ("dataset", "val_split", "val_seed", "val_images", "fov")


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description="PyTorch U-Net training on DRIVE", add_help=add_help)
    parser.add_argument("--data-path", default="./",
                        help="drive: the folder that holds DRIVE/; other datasets: the folder their archive "
                             "unpacks to (see my_dataset.py)")
    parser.add_argument("--dataset", default="drive", choices=DATASETS, help="file layout and split of --data-path")
    parser.add_argument("--val-split", default=0, type=int, metavar="N",
                        help="validate (and pick best_model.pth) on N held-out training images instead of the "
                             "test split, which only --test-only then reads (default 0: the tutorial's protocol)")
    parser.add_argument("--val-seed", default=0, type=int, help="seed of --val-split's choice of images")
    parser.add_argument("--fov", default="estimate", choices=FOV_MODES,
                        help="field of view of images without a FOV mask (CHASE_DB1, STARE, a folder without "
                             "masks/): estimate it from the dark border as predict.py does, or count all pixels")
    parser.add_argument("--val-tile-size", default=1024, type=int,
                        help="validation images larger than this are predicted in tiles, as predict.py does "
                             "(0: never)")
    parser.add_argument("--num-classes", default=1, type=int, help="foreground classes (background excluded)")
    parser.add_argument("--model", default="unet", choices=src.MODEL_NAMES)
    parser.add_argument("--base-c", default=32, type=int,
                        help="U-Net width (channels of the first stage; --recipe fast: 32 with AMP, else 16)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present, else cpu)")
    parser.add_argument("-b", "--batch-size", default=4, type=int, help="images per step (per process under DDP)")
    parser.add_argument("--epochs", default=200, type=int, metavar="N",
                        help="number of total epochs to train (--recipe fast: 50)")
    parser.add_argument("-j", "--workers", default=None, type=int,
                        help="data-loading worker processes (default: 0 on the CPU, else min(cpus, batch size, 8))")
    parser.add_argument("--lr", default=0.01, type=float, help="initial learning rate")
    parser.add_argument("--momentum", default=0.9, type=float)
    parser.add_argument("--wd", "--weight-decay", default=1e-4, type=float, dest="weight_decay")
    parser.add_argument("--print-freq", default=1, type=int, help="print every N steps")
    parser.add_argument("--output-dir", default="save_weights", help="checkpoints and logs go here")
    parser.add_argument("--resume", default="", help="checkpoint to resume from (or to evaluate with --test-only)")
    parser.add_argument("--start-epoch", "--start_epoch", default=0, type=int, metavar="N",
                        help="first epoch (overridden by --resume)")
    parser.add_argument("--save-best", "--save_best", default=True, action=argparse.BooleanOptionalAction,
                        help="keep best_model.pth (best validation dice); --no-save-best keeps model_N.pth "
                             "of every epoch instead")
    parser.add_argument("--amp", default=False, action=argparse.BooleanOptionalAction,
                        help="mixed precision: float16 on CUDA (see --amp-dtype), bfloat16 on the CPU "
                             "(--recipe fast: on where it is faster, CUDA and CPUs with bfloat16 hardware)")
    parser.add_argument("--amp-dtype", default=None, choices=["float16", "bfloat16"],
                        help="with --amp: the autocast dtype (default float16 on CUDA, bfloat16 on the CPU)")
    parser.add_argument("--crop-size", default=None, type=int,
                        help=f"training crop (pixels; default {CROP_SIZE}, or --base-size if smaller)")
    parser.add_argument("--base-size", default=None, type=int,
                        help=f"random resize of the shorter side to --scale-range x this (default: drive {BASE_SIZE}, "
                             "else the median shorter side of the training images)")
    parser.add_argument("--scale-range", default=SCALE_RANGE, type=float, nargs=2, metavar=("MIN", "MAX"),
                        help="training images are resized by a random factor in [MIN, MAX] of --base-size "
                             f"(default {SCALE_RANGE[0]} {SCALE_RANGE[1]}, the tutorial's)")
    parser.add_argument("--mean", default=None, type=float, nargs=3,
                        help=f"default: the dataset's (compute_mean_std.py), DRIVE's {DRIVE_MEAN} for hrf/folder")
    parser.add_argument("--std", default=None, type=float, nargs=3, help=f"default: as --mean; DRIVE's {DRIVE_STD}")
    parser.add_argument("--pretrained-backbone", default="", metavar="PATH",
                        help="local torchvision ImageNet weight file for the vgg16/mobilenet encoder")
    parser.add_argument("--seed", default=None, type=int, help="seed every random generator")
    parser.add_argument("--deterministic", action="store_true", help="use deterministic algorithms only")
    parser.add_argument("--channels-last", "--channels_last", default=None, action=argparse.BooleanOptionalAction,
                        help="NHWC memory format for training (default: on CUDA only, as the CPU's BatchNorm "
                             "statistics are less exact in it); validation uses it unless --no-channels-last")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--stop-epoch", default=None, type=int, metavar="N",
                        help="stop after epoch N of the --epochs schedule (e.g. a time-limited job); "
                             "--resume checkpoint.pth continues it")
    parser.add_argument("--test-only", action="store_true", help="only evaluate (the weights of --resume)")
    parser.add_argument("--demo", action="store_true",
                        help="write a small synthetic DRIVE-format sample (if absent) and train on it on the CPU")
    # Recipes (train_utils/recipes.py): --recipe sets defaults for the flags below and some above.
    parser.add_argument("--recipe", default="tutorial", choices=sorted(RECIPES),
                        help="tutorial: the tutorial's run; fast: AdamW + cosine, 4 crops of 256 per image in batches "
                             "of 4, rotation and colour jitter, AMP where it is faster (then base_c 32, else 16), "
                             "flip-averaged validation every 10 epochs "
                             "(explicit flags win; with --demo, the demo's sizes win)")
    parser.add_argument("--opt", default="sgd", choices=["sgd", "adamw"], help="optimiser (sgd uses --momentum)")
    parser.add_argument("--lr-schedule", default="poly", choices=["poly", "cosine"],
                        help="per-step decay after the 1-epoch warm-up: (1 - progress) ** 0.9 or cosine to 0")
    parser.add_argument("--crops-per-image", default=1, type=int, metavar="N",
                        help="random crops of every training image per epoch")
    parser.add_argument("--rotate", default=0.0, type=float, metavar="DEG",
                        help="random rotation in [-DEG, DEG] degrees (0: none)")
    parser.add_argument("--color-jitter", default=0.0, type=float, metavar="S",
                        help="random brightness and contrast in [1-S, 1+S], gamma in [exp(-S), exp(S)] (0: none)")
    parser.add_argument("--eval-tta", default=False, action=argparse.BooleanOptionalAction,
                        help="validate on the softmax averaged over the image and its two flips")
    parser.add_argument("--eval-every", default=1, type=int, metavar="N",
                        help="validate every N epochs (and always after the last one)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    # Pictures and TensorBoard (train_utils/visuals.py)
    parser.add_argument("--plots", default=True, action=argparse.BooleanOptionalAction,
                        help="write curves.png after every epoch and val_preview.png for the best model "
                             "(--no-plots: neither)")
    parser.add_argument("--tensorboard", action=visuals.TensorBoardFlag,
                        help="also log the metrics and the preview for TensorBoard in OUTPUT_DIR/tensorboard "
                             "(needs: pip install tensorboard)")
    return parser


def parse_args(parser, argv=None):
    """Parse, with ``--recipe`` and ``--demo`` changing the defaults (explicit flags still win).

    Precedence: typed flags, then ``--demo``'s defaults, then the recipe's: the
    demo's sample is 128 px wide, so its sizes (crop, base size, epochs, width,
    batch) must win, while the recipe still picks the optimiser, schedule,
    augmentation and evaluation.

    ``args.explicit_flags`` names the settings typed on the command line: those
    may not silently give way to a checkpoint's.
    """
    pre, _ = parser.parse_known_args(argv)
    parser.set_defaults(**RECIPES[pre.recipe])
    if pre.demo:
        parser.set_defaults(**DEMO_DEFAULTS)
    args = parser.parse_args(argv)
    args.explicit_flags = explicit_flags(parser, argv)
    return args


def explicit_flags(parser, argv=None):
    """The ``dest`` of every option given in ``argv``: parsed over a namespace pre-filled with a marker,
    so argparse fills in no defaults and whatever changed was typed."""
    unset = object()
    namespace = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_known_args(argv, namespace=namespace)
    return {k for k, v in vars(namespace).items() if v is not unset}


def create_model(num_classes, base_c=32, model="unet", pretrained_backbone=""):
    """The model for ``num_classes`` outputs (background included)."""
    try:
        net = src.build_model(model=model, num_classes=num_classes, base_c=base_c)
    except ValueError as e:
        raise UserError(str(e)) from None
    if pretrained_backbone:
        load_backbone_file(net, pretrained_backbone)
    return net


def load_backbone_file(model, path):
    """ImageNet encoder weights from a local torchvision file (``--pretrained-backbone``), one-line errors."""
    state = safe_load(path, what="backbone weight file")
    try:
        src.load_backbone_weights(model, state, source=str(path))
    except ValueError as e:
        raise UserError(str(e)) from None


def check_args(args):
    """Reject impossible settings before any work starts."""
    for name in ("num_classes", "batch_size", "epochs", "crop_size", "base_size", "base_c", "print_freq",
                 "crops_per_image", "eval_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if args.workers is not None and args.workers < 0:
        raise UserError("--workers must be >= 0")
    if args.test_only and not args.resume:
        raise UserError("--test-only needs the weights to evaluate: --resume PATH")
    if args.std is not None and min(args.std) <= 0:
        raise UserError("--std values must be positive")
    if args.val_split < 0 or args.val_tile_size < 0:
        raise UserError("--val-split and --val-tile-size must be >= 0")
    if not 0 <= args.rotate <= 180:
        raise UserError(f"--rotate must be in [0, 180] degrees (got {args.rotate})")
    if not 0 < args.scale_range[0] <= args.scale_range[1]:
        raise UserError(f"--scale-range needs 0 < MIN <= MAX (got {args.scale_range[0]} {args.scale_range[1]})")
    if not 0 <= args.color_jitter < 1:
        raise UserError(f"--color-jitter must be in [0, 1) (got {args.color_jitter})")


def prepare_output_dir(path):
    """Create ``path`` and prove it is writable, before hours of training depend on it.

    Also removes temporary checkpoint files a killed run may have left behind.
    """
    ensure_writable_folder(path, f"--output-dir '{path}'")
    for name in os.listdir(path):
        if name.startswith(".") and ".pth.tmp" in name:
            os.remove(os.path.join(path, name))


def default_workers(device, batch_size, workers=None):
    """DataLoader processes: ``--workers`` if given; none on the CPU; else min(cpus, batch size, 8).

    On the CPU the loader's processes only compete with the model for the cores,
    and forking a process that holds the model costs seconds per epoch; the
    cached dataset needs no help.
    """
    if workers is not None:
        return workers
    if device.type == "cpu" or batch_size == 1:
        return 0
    return min(os.cpu_count() or 1, batch_size, 8)


def default_train_channels_last(device, channels_last=None, amp_dtype=None):
    """Train in channels_last? ``--channels-last`` / ``--no-channels-last`` decide (for validation too).

    By default training uses it on CUDA, and on the CPU only with bfloat16
    AMP: the CPU's float32 BatchNorm kernel computes batch statistics less
    exactly in channels_last (a first-step loss 1.8e-4 off the float64 value
    instead of 5e-8), which would change the numbers, while oneDNN's bfloat16
    convolutions are much faster in it (a U-Net step 1.4-2.3x). Validation
    (BatchNorm folded away) uses it everywhere.
    """
    if channels_last is not None:
        return channels_last
    return device.type == "cuda" or amp_dtype == torch.bfloat16


def build_datasets(args):
    """(training dataset or None under --test-only, validation dataset), with the sizes defaulted.

    Validation is the test split (the tutorial's protocol) or, with
    ``--val-split N``, N training images held out by a seeded choice that is
    recorded in ``args.val_images`` (and so in the checkpoint).
    """
    eval_tf = get_transform(False, args.mean, args.std)
    kw = dict(num_classes=args.num_classes, fov=args.fov)
    where = f"the {args.dataset} dataset in '{args.data_path}'"
    if args.test_only:
        test = dataset_files(args.dataset, args.data_path, "test")
        if not test:
            raise UserError(f"{where} has no test images to evaluate")
        return None, VesselDataset(test, eval_tf, **kw)

    train = dataset_files(args.dataset, args.data_path, "training")
    if not train:
        raise UserError(f"{where} has no training images")
    if args.val_split:
        held = holdout(len(train), args.val_split, args.val_seed)
        names = [os.path.basename(train[i].image) for i in held]
        if getattr(args, "val_images", None) and args.val_images != names:  # resumed: same images or nothing
            raise UserError(f"the checkpoint validated on {', '.join(args.val_images)}, but --val-split now "
                            f"picks {', '.join(names)}: the training images changed")
        args.val_images = names
        val = [train[i] for i in held]
        train = [t for i, t in enumerate(train) if i not in held]
        print(f"validation: {len(val)} held-out training images ({', '.join(names)}); "
              f"the test split is left for --test-only")
    else:
        val = dataset_files(args.dataset, args.data_path, "test")
        if not val:
            raise UserError(f"{where} has no test images to validate on; hold out training images with "
                            "--val-split N")
    train_dataset = VesselDataset(train, **kw)
    default_sizes(args, train_dataset)
    train_dataset.transforms = get_transform(True, args.mean, args.std, base_size=args.base_size,
                                             crop_size=args.crop_size, rotate=args.rotate,
                                             color_jitter=args.color_jitter, scale_range=args.scale_range)
    return train_dataset, VesselDataset(val, eval_tf, **kw)


def default_sizes(args, train_dataset):
    """``--base-size`` and ``--crop-size`` when not given: the tutorial's for DRIVE; for other datasets the
    median shorter side of the training images, and a crop no larger than that."""
    if args.base_size is None:
        if args.dataset == "drive":
            args.base_size = BASE_SIZE
        else:
            args.base_size = int(np.median([min(hw) for hw in train_dataset.image_sizes()]))
    if args.crop_size is None:
        args.crop_size = min(CROP_SIZE, args.base_size)
    lo, hi = args.scale_range
    print(f"training images: random resize of the shorter side to [{lo:g}, {hi:g}] x {args.base_size}, "
          f"crop {args.crop_size}")


def build_data_loaders(args, device):
    """(train loader or None under --test-only, validation loader).

    Under DDP the training set is shuffled per epoch by a DistributedSampler and
    every validation image goes to exactly one process.
    """
    train_dataset, val_dataset = build_datasets(args)
    num_workers = default_workers(device, args.batch_size, args.workers)
    pin = device.type == "cuda"
    val_sampler = utils.ShardedEvalSampler(val_dataset) if args.distributed else SequentialSampler(val_dataset)
    # Every pass over a DataLoader draws a seed for its workers from the loader's generator, or from the global
    # RNG when it has none: a private one keeps validation out of training's random stream, so how often a run
    # validates (--eval-every) does not change the model it trains.
    val_loader = DataLoader(val_dataset, batch_size=1, sampler=val_sampler, num_workers=min(num_workers, 2),
                            pin_memory=pin, collate_fn=VesselDataset.collate_fn, generator=torch.Generator())
    if train_dataset is None:
        return None, val_loader

    if args.crops_per_image > 1:
        train_dataset = RepeatDataset(train_dataset, args.crops_per_image)
    if args.batch_size > len(train_dataset) // args.world_size:
        samples = "training images" if args.crops_per_image == 1 else f"crops ({args.crops_per_image} per image)"
        raise UserError(f"--batch-size {args.batch_size} is larger than the {len(train_dataset)} {samples}"
                        + (f" split over {args.world_size} processes" if args.distributed else ""))
    if args.distributed:
        train_sampler = DistributedSampler(train_dataset, shuffle=True, seed=args.seed or 0)
    else:
        train_sampler = RandomSampler(train_dataset)
    train_loader = DataLoader(train_dataset, batch_size=args.batch_size, sampler=train_sampler,
                              num_workers=num_workers, pin_memory=pin, collate_fn=VesselDataset.collate_fn)
    return train_loader, val_loader


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(args):
    check_args(args)
    utils.init_distributed_mode(args)
    device = utils.resolve_device(args.device, local_rank=args.gpu, distributed=args.distributed)
    print(f"using {device.type} device" + (f" {device}" if device.type == "cuda" else "")
          + (f", {args.world_size} processes ({args.dist_backend})" if args.distributed else ""))
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    if checkpoint is not None:  # the checkpoint's model, class count and normalisation
        adopt_checkpoint_args(args, checkpoint["args"], args.resume, getattr(args, "explicit_flags", ()),
                              keys=CARRIED_KEYS if args.test_only else CARRIED_KEYS + RESUMED_KEYS,
                              overridable=RUN_KEYS)
    amp_dtype = autocast_dtype(device, args.amp, args.amp_dtype)
    if args.base_c is None:  # --recipe fast: the width its time budget allows at this precision
        args.base_c = fast_width(amp_dtype)
    set_default_normalisation(args)
    print(argparse.Namespace(**plain_args(args)))
    seed_and_tune(args, device)
    num_classes = args.num_classes + 1  # background + foreground classes

    if args.demo and utils.is_main_process():
        ensure_synthetic_drive(args.data_path, **DEMO_DATA)
    if args.distributed:
        torch.distributed.barrier()
    if utils.is_main_process():
        prepare_output_dir(args.output_dir)  # --test-only too: test_metrics.csv goes there
    train_loader, val_loader = build_data_loaders(args, device)

    # A resumed run takes its weights from the checkpoint: no backbone file needed.
    model = create_model(num_classes, args.base_c, args.model,
                         "" if checkpoint is not None else args.pretrained_backbone).to(device)
    if args.test_only:
        resume(checkpoint, args.resume, model)
        print(f"loaded '{args.resume}' (epoch {checkpoint.get('epoch', '?')})")
        rows = []
        _, dice, vessel = report_validation(model, val_loader, device, num_classes, args.channels_last,
                                            args.eval_tta, args.val_tile_size, src.model_spec(args.model).size_multiple,
                                            per_image=rows)
        rows = gather_image_rows(val_loader, rows)
        if utils.is_main_process():
            path = write_test_metrics(args.output_dir, rows, dice, vessel)
            print(f"per-image metrics: '{path}'")
        return

    train_channels_last = default_train_channels_last(device, args.channels_last, amp_dtype)
    print(f"training in {'float32' if amp_dtype is None else str(amp_dtype).replace('torch.', '') + ' autocast'}, "
          f"{'channels_last' if train_channels_last else 'NCHW'}")
    if train_channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_model = wrap_for_training(model, args, device)  # DDP and/or torch.compile around the same module
    params_to_optimize = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params_to_optimize, args.opt, args.lr, args.momentum, args.weight_decay)
    lr_scheduler = create_lr_scheduler(optimizer, len(train_loader), args.epochs, warmup=True,
                                       schedule=args.lr_schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    best_dice = 0.0
    if checkpoint is not None:
        args.start_epoch, best_dice = resume(checkpoint, args.resume, model, optimizer, lr_scheduler, scaler,
                                             rank=args.rank, world_size=args.world_size)
        print(f"resuming '{args.resume}' at epoch {args.start_epoch} (best dice {best_dice:.3f})")
        del checkpoint

    results_file = os.path.join(args.output_dir, "results{}.txt".format(
        datetime.datetime.now().strftime("%Y%m%d-%H%M%S")))
    start_time = time.time()
    last_epoch = args.epochs if args.stop_epoch is None else min(args.epochs, args.stop_epoch + 1)
    for epoch in range(args.start_epoch, last_epoch):
        if args.distributed:
            train_loader.sampler.set_epoch(epoch)
        epoch_start = time.time()
        mean_loss, lr = train_one_epoch(train_model, optimizer, train_loader, device, epoch, num_classes,
                                        lr_scheduler=lr_scheduler, print_freq=args.print_freq, scaler=scaler,
                                        amp_dtype=amp_dtype, channels_last=train_channels_last)
        utils.broadcast_buffers(model)  # every process validates and saves rank 0's BatchNorm statistics
        # --eval-every N: validation of full images costs as much as several training steps; the last
        # epoch is always validated, so the log ends with the final model's dice.
        validate = (epoch + 1) % args.eval_every == 0 or epoch == last_epoch - 1
        is_best = False
        if validate:
            confmat, dice, vessel = report_validation(model, val_loader, device, num_classes, args.channels_last,
                                                      args.eval_tta, args.val_tile_size, src.model_spec(args.model).size_multiple)
            is_best = dice > best_dice
            best_dice = max(best_dice, dice)
        record = None
        if validate and utils.is_main_process():
            now = time.time()
            record = log_epoch(args.output_dir, results_file, epoch, mean_loss, lr, dice, confmat, vessel,
                               now - epoch_start, elapsed=now - start_time)
        save_epoch(args.output_dir, model, optimizer, lr_scheduler, scaler, epoch, best_dice, is_best, args)

        # Pictures and TensorBoard (train_utils/visuals.py): main process only, never stops training.
        if validate:
            visuals.after_epoch(args, record)
        if is_best:
            visuals.after_best(args, epoch, model, val_loader.dataset, device)

    total_time = time.time() - start_time
    print(f"training time {datetime.timedelta(seconds=int(total_time))}; best dice coefficient: {best_dice:.3f}")
    if args.distributed:
        torch.distributed.barrier()


def set_default_normalisation(args):
    """mean/std not given (nor taken from a checkpoint): ImageNet's for a pretrained encoder, else the
    dataset's training-split statistics where known, else DRIVE's."""
    spec = DATASETS[getattr(args, "dataset", "drive")]
    mean, std = spec.mean, spec.std
    if args.mean is None:
        args.mean = list(src.IMAGENET_MEAN if args.pretrained_backbone else mean)
    if args.std is None:
        args.std = list(src.IMAGENET_STD if args.pretrained_backbone else std)


def seed_and_tune(args, device):
    if args.seed is not None:
        seed_everything(args.seed + args.rank)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def wrap_for_training(model, args, device):
    """What the training step runs: ``model`` under DDP (with SyncBatchNorm if asked) and/or torch.compile.

    The wrappers share ``model``'s parameters, so ``model`` is what is validated and saved.
    """
    if args.distributed and getattr(args, "sync_bn", False):
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:  # torch's SyncBatchNorm runs on GPUs only
            print("note: --sync-bn is ignored on the CPU (SyncBatchNorm needs CUDA)")
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return torch.compile(model) if args.compile else model


def log_epoch(output_dir, results_file, epoch, mean_loss, lr, dice, confmat, vessel, epoch_time, elapsed=None):
    """The tutorial's results block for the epoch, and one JSON line in ``log.jsonl``; returns that record.

    ``epoch_time`` is this epoch's training and validation; ``elapsed`` the seconds since this
    process's first epoch began (training, validation and checkpoints of every epoch since, also
    those not validated under ``--eval-every``).
    """
    with open(results_file, "a") as f:
        f.write(f"[epoch: {epoch}]\ntrain_loss: {mean_loss:.4f}\nlr: {lr:.6f}\n"
                f"dice coefficient: {dice:.3f}\n{confmat}\n{format_metrics(vessel)}\n\n")
    record = {"epoch": epoch, "train_loss": mean_loss, "lr": lr, "dice": dice,
              **confmat.summary(), **vessel, "epoch_time": epoch_time}
    if elapsed is not None:
        record["elapsed"] = elapsed
    with open(os.path.join(output_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
    return record


def json_safe(value):
    """NaN/inf as null, recursively: a split without vessels has no AUC or vessel IoU, and strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def report_validation(model, val_loader, device, num_classes, channels_last=None, tta=False, tile_size=0,
                      multiple=16, per_image=None):
    """Evaluate and print the tutorial's block, ``dice coefficient: x`` and the vessel metrics.

    Validation runs in float32 whatever ``--amp`` says (as the tutorial's), on a
    copy of ``model`` with BatchNorm folded into the convolutions, in channels_last
    unless ``channels_last`` is False; images larger than ``tile_size`` in tiles.
    Returns (confusion matrix, dice, vessel metrics as a dict): the AUC sorts
    every validation pixel, so it is computed once here. With ``tta`` every
    metric scores the softmax averaged over the image and its two flips
    (``--eval-tta``). ``per_image``: see ``evaluate``.
    """
    channels_last = channels_last is not False
    vessel = VesselMetrics(ignore_index=255)
    eval_model = inference_model(model, channels_last)
    if tta:
        eval_model = FlipAverage(eval_model, channels_last)
    confmat, dice = evaluate(eval_model, val_loader, device=device, num_classes=num_classes,
                             channels_last=channels_last, vessel_metrics=vessel, tile_size=tile_size,
                             multiple=multiple, per_image=per_image)
    vessel_values = vessel.compute()
    print(confmat)
    print(f"dice coefficient: {dice:.3f}")
    print(format_metrics(vessel_values))
    return confmat, dice, vessel_values


TEST_METRICS_FILE = "test_metrics.csv"
TEST_METRICS_COLUMNS = ("dice",) + VesselMetrics.NAMES


def gather_image_rows(val_loader, rows):
    """Every process's per-image rows, as (image file name, row) in the dataset's order (on every process)."""
    indices = list(iter(val_loader.sampler))  # batch size 1: one row per index, in this order
    pairs = list(zip(indices, rows))
    if utils.is_dist_avail_and_initialized():
        gathered = [None] * utils.get_world_size()
        torch.distributed.all_gather_object(gathered, pairs)
        pairs = [p for part in gathered for p in part]
    names = val_loader.dataset.img_list
    return [(os.path.basename(names[i]), row) for i, row in sorted(pairs, key=lambda p: p[0])]


def write_test_metrics(output_dir, rows, dice, vessel):
    """``test_metrics.csv``: a row per image (its dice and vessel metrics), then ``pooled``: the printed values."""
    path = os.path.join(output_dir, TEST_METRICS_FILE)

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(("image",) + TEST_METRICS_COLUMNS)
            for name, row in rows + [("pooled", {"dice": dice, **vessel})]:
                w.writerow([name] + [f"{row[k]:.6f}" for k in TEST_METRICS_COLUMNS])

    atomic_write(path, write)
    return path


def cli(parser, argv=None):
    args = parse_args(parser, argv)
    try:
        run_cli(main, args, debug=args.debug)
    finally:
        utils.cleanup_distributed()


if __name__ == "__main__":
    cli(get_args_parser())
