"""Train the U-Net on DRIVE (or CHASE_DB1, STARE, HRF, a folder) on one process (CPU or one GPU);
``train_multi_GPU.py`` runs the same loop under DDP.

    python train.py --demo                                   # synthetic sample, CPU-sized, end to end
    python train.py --data-path /data --num-classes 1 --epochs 200
    python train.py --dataset chase_db1 --data-path CHASEDB1 --val-split 4      # validate on 4 held-out images
    python train.py --data-path /data --resume save_weights/checkpoint.pth   # continue
    python train.py --data-path /data --test-only --weights save_weights/best_model.pth
    python train.py --data-path /data --recipe fast          # shorter run: AdamW, small crops, AMP

Every setting is decided once, in ``train_utils/settings.py``, and printed at
start-up with where its value came from.
"""
import argparse
import datetime
import json
import math
import os
import random
import time
from typing import NamedTuple

from train_utils.allocator import use_fast_allocator
from train_utils.cli import parse_args, train_parser as get_args_parser

# First, before torch loads: --help and mistyped flags are answered at once (train_utils/cli.py imports no
# torch); then the script runs again with a fast allocator (train_utils/allocator.py).
if __name__ == "__main__":
    cli_args = parse_args(get_args_parser(doc=__doc__))
    use_fast_allocator()

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

import src
from my_dataset import (DATASETS, BalancedSampler, RepeatDataset, SameSizeBatchSampler, VesselDataset, dataset_files,
                        holdout)
from train_utils import distributed_utils as utils
from train_utils.checkpoint import (CheckpointWriter, init_weights, load_checkpoint, require_checkpoint_space, resume,
                                   safe_load, save_epoch)
from train_utils.device_data import DeviceBatches, DeviceLoader, fits_on, validation_on
from train_utils.errors import UserError, run_cli
from train_utils.evaluation import DatasetResults, validate, write_test_metrics
from train_utils.files import append_text, ensure_writable_folder, remove_new_empty_folders, restart_epoch_log
from train_utils.imaging import check_min_size, image_size
from train_utils.pictures import TrainingPictures
from train_utils.precision import cpu_has_native_bf16
from train_utils.settings import DEMO_DATA, Machine, per_dataset, resolve_settings
from train_utils.synthetic import ensure_synthetic_drive
from train_utils.train_and_eval import build_optimizer, create_lr_scheduler, train_one_epoch
from train_utils.transforms import get_transform


def detect_machine():
    return Machine(default_device="cuda" if torch.cuda.is_available() else "cpu", cpu_bf16=cpu_has_native_bf16())


class Source(NamedTuple):
    """One dataset of the run: its registry name, its folder and how many training images it holds out."""
    name: str
    path: str
    val_split: int


def dataset_sources(values):
    """The run's datasets: ``--dataset a b --data-path A B`` (``--val-split`` once, or once per dataset)."""
    names, paths, splits = (per_dataset(values[k]) for k in ("dataset", "data_path", "val_split"))
    if len(paths) != len(names):
        raise UserError(f"--data-path needs one folder per --dataset: got {len(names)} dataset(s) and "
                        f"{len(paths)} folder(s)")
    if len(splits) == 1:
        splits = splits * len(names)
    elif len(splits) != len(names):
        raise UserError(f"--val-split takes one N, or one per dataset ({len(names)}); got {len(splits)}")
    if len(set(zip(names, paths))) < len(names):
        raise UserError("--dataset/--data-path names the same dataset twice")
    return [Source(*source) for source in zip(names, paths, splits)]


def dataset_facts(values):
    """The datasets' settings (their registry entries and training images): mean/std, FOV masks, the random
    resize's base size and the held-out validation images (``--val-split``/``--val-images``).

    Several datasets share one normalisation, the mean of theirs, and each keeps its own base size (a
    tuple); with ``--fov-diameter`` every photograph is brought to its working scale, and the random resize
    varies each around its own size (base size 0).
    """
    sources = dataset_sources(values)
    specs = [DATASETS[source.name] for source in sources]
    facts = {}
    if not values["pretrained_backbone"]:
        facts["mean"], facts["std"] = (specs[0].mean, specs[0].std) if len(specs) == 1 else (
            tuple(float(np.mean(c)) for c in zip(*(sp.mean for sp in specs))),
            tuple(float(np.mean(c)) for c in zip(*(sp.std for sp in specs))))
    if all(sp.fov_masks for sp in specs):
        facts["fov"] = "masks"
    if any(sp.av for sp in specs):
        facts["num_classes"] = 2  # artery, vein (with vessel-only datasets beside them: vessels of either class)
    if values["test_only"]:
        return facts
    bases, held = [], []
    for source, spec in zip(sources, specs):
        base = spec.base_size
        if base is None or source.val_split or values["val_images"]:
            train, names = split_training_images(source, values)
            held += names or []
            if base is None:  # the median shorter side of the images it trains on
                base = int(np.median([min(image_size(s.image)) for s in train]))
        bases.append(base)
    unknown = [n for n in values["val_images"] or () if n not in held]
    if unknown:
        raise UserError(f"--val-images: {', '.join(unknown)} not among the training images of "
                        f"{', '.join(repr(s.path) for s in sources)}")
    if held:
        facts["val_images"] = held
    facts["base_size"] = 0 if values["fov_diameter"] else (bases[0] if len(bases) == 1 else tuple(bases))
    return facts


def split_training_images(source, values):
    """(training samples, names of the held-out validation images or None) of one dataset of the run:
    ``--val-split``'s seeded choice, or the images ``--val-images`` (or the checkpoint) names."""
    if values["demo"]:
        ensure_synthetic_drive(source.path, **DEMO_DATA)
    train = dataset_files(source.name, source.path, "training")
    if not train:
        raise UserError(f"the {source.name} dataset in '{source.path}' has no training images")
    names = [os.path.basename(t.image) for t in train]
    wanted = [n for n in values["val_images"] or () if n in names]  # this dataset's (dataset_facts: the rest)
    if source.val_split:
        held = [names[i] for i in holdout(len(train), source.val_split, values["val_seed"])]
        if wanted and wanted != held:  # resumed: the same images or nothing
            raise UserError(f"--val-split {source.val_split} picks {', '.join(held)}, but the run validated "
                            f"on {', '.join(wanted)} (the checkpoint, or --val-images): the training images "
                            "changed, or give only one of --val-split and --val-images")
    elif wanted:
        if len(set(wanted)) >= len(names):
            raise UserError("--val-images must leave at least one training image")
        held = [n for n in names if n in wanted]  # in the dataset's order
    else:
        return train, None
    return [t for t, n in zip(train, names) if n not in held], held


def build_datasets(s):
    """([(dataset name, training dataset)], empty under --test-only; [(dataset name, validation dataset)]).

    Validation is each dataset's test split (the tutorial's protocol) or its
    held-out training images (``split_training_images``: ``--val-split``'s
    choice, or the images ``--val-images`` names). Validation images keep their own size: with
    ``--fov-diameter`` only the photograph is rescaled, and the prediction is
    scored at the label's size.
    """
    sources = dataset_sources(s.as_dict())
    eval_tf = get_transform(False, s.mean, s.std)
    kw = dict(num_classes=s.num_classes, fov=s.fov, fov_diameter=s.fov_diameter,
              fov_diameter_max=s.fov_diameter_max)
    bases = per_dataset(s.base_size) if isinstance(s.base_size, (list, tuple)) else [s.base_size] * len(sources)
    train_parts, val_parts = [], []
    av_run = any(DATASETS[source.name].av for source in sources)
    for source, base in zip(sources, bases):
        kw["av"] = DATASETS[source.name].av
        kw["vessel_any"] = av_run and not kw["av"]  # its vessels supervise "artery or vein", and it is not scored
        where = f"the {source.name} dataset in '{source.path}'"
        say = print if len(sources) == 1 else (lambda line, n=source.name: print(f"{n}: {line}"))
        if kw["vessel_any"] and s.test_only:
            continue
        if s.test_only:
            test = dataset_files(source.name, source.path, "test")
            if not test:
                raise UserError(f"{where} has no test images to evaluate")
            val_parts.append((source.name, VesselDataset(test, eval_tf, resize_target=False, **kw)))
            continue
        train, held_names = split_training_images(source, s.as_dict())
        if kw["vessel_any"]:
            say("training only: its vessel labels supervise artery and vein together (1 - P(background)); "
                "it is not validated")
        elif held_names:
            val = [t for t in dataset_files(source.name, source.path, "training")
                   if os.path.basename(t.image) in held_names]
            say(f"validation: {len(val)} held-out training images ({', '.join(held_names)}); "
                f"the test split is left for --test-only")
        else:
            val = dataset_files(source.name, source.path, "test")
            if not val:
                raise UserError(f"{where} has no test images to validate on; hold out training images with "
                                "--val-split N")
        train_tf = get_transform(True, s.mean, s.std, base_size=base, crop_size=s.crop_size, rotate=s.rotate,
                                 color_jitter=s.color_jitter, scale_range=s.scale_range, crop_first=s.crop_first,
                                 noise=s.noise)
        lo, hi = s.scale_range
        say(f"training images: random resize of the shorter side to [{lo:g}, {hi:g}] x {base or 'its own'}"
            + (f", rotation within {s.rotate:g} degrees" if s.rotate else "") + f", crop {s.crop_size}"
            + (" (sampled crop-first)" if s.crop_first else "")
            + (f", Gaussian noise of sd up to {s.noise:g} on half the crops" if s.noise else "")
            + (f", photographs rescaled to a FOV {s.fov_diameter} px across" if s.fov_diameter else "")
            + (f" (up to {s.fov_diameter_max} px at their own scale)" if s.fov_diameter_max else ""))
        train_parts.append((source.name, VesselDataset(train, train_tf, **kw)))
        if not kw["vessel_any"]:
            val_parts.append((source.name, VesselDataset(val, eval_tf, resize_target=False, **kw)))
    return train_parts, val_parts


def build_data_loaders(s, proc, device):
    """(train loader or None under --test-only, [(dataset name, validation loader)]), after writing the
    demo's sample and preparing the output folder. Under DDP the training set is shuffled per epoch by a
    DistributedSampler and every validation image goes to exactly one process. Several datasets are
    drawn equally often (``BalancedSampler``), however many images each has."""
    if s.demo and utils.is_main_process():
        ensure_synthetic_drive(s.data_path, **DEMO_DATA)
    if proc.distributed:
        torch.distributed.barrier()
    if utils.is_main_process():
        prepare_output_dir(s.output_dir)  # --test-only too: test_metrics.csv goes there
    train_parts, val_parts = build_datasets(s)
    check_min_size([p for _, ds in val_parts for p in ds.img_list], src.model_spec(s.model).size_multiple, s.model)
    pin = device.type == "cuda"
    # Every pass over a DataLoader draws a seed for its workers from the loader's generator, or from the global
    # RNG when it has none: a private one keeps validation out of training's random stream, so how often a run
    # validates (--eval-every) does not change the model it trains.
    val_loaders = [(name, DataLoader(ds, batch_sampler=SameSizeBatchSampler(
                        utils.ShardedEvalSampler(ds) if proc.distributed else SequentialSampler(ds),
                        [tuple(t.shape for t in ds.raw(i)) for i in range(len(ds))], s.val_batch_size),
                        num_workers=min(s.workers, 2), pin_memory=pin, collate_fn=VesselDataset.collate_fn,
                        generator=torch.Generator()))
                   for name, ds in val_parts]
    if s.data_on_device:
        val_loaders = [(name, validation_on(loader, device) or loader) for name, loader in val_loaders]
        left = [name for name, loader in val_loaders if not isinstance(loader, DeviceBatches)]
        print(f"the validation images are preprocessed once and kept on {device} (--data-on-device)" if not left
              else f"--data-on-device: the validation images of {', '.join(left)} do not fit in a quarter of "
                   f"{device}'s free memory; a loader reads them each epoch")
    if not train_parts:
        return None, val_loaders
    parts = [RepeatDataset(ds, s.crops_per_image) if s.crops_per_image > 1 else ds for _, ds in train_parts]
    train_dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    if s.batch_size > len(train_dataset) // proc.world_size:
        samples = "training images" if s.crops_per_image == 1 else f"crops ({s.crops_per_image} per image)"
        raise UserError(f"--batch-size {s.batch_size} is larger than the {len(train_dataset)} {samples}"
                        + (f" split over {proc.world_size} processes" if proc.distributed else ""))
    if len(parts) > 1:
        train_sampler = BalancedSampler([len(p) for p in parts], seed=s.seed, rank=proc.rank,
                                        world_size=proc.world_size)
        print("training draws equally from " + ", ".join(f"{name} ({len(ds)} images)" for name, ds in train_parts))
    elif proc.distributed:
        train_sampler = DistributedSampler(train_dataset, shuffle=True, seed=s.seed or 0)
    else:
        train_sampler = RandomSampler(train_dataset)
    if s.data_on_device:
        if fits_on(train_dataset, device):
            print(f"training batches are made on {device} from its copy of the training images (--data-on-device)")
            return DeviceLoader(train_dataset, train_sampler, s.batch_size, device), val_loaders
        print(f"--data-on-device: the training images do not fit in half of {device}'s free memory; the loader "
              "makes the batches")
    train_loader = DataLoader(train_dataset, batch_size=s.batch_size, sampler=train_sampler,
                              num_workers=s.workers, pin_memory=pin, collate_fn=VesselDataset.collate_fn)
    return train_loader, val_loaders


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


def main(args):
    # 0. Settings, decided once (train_utils/settings.py), and the processes.
    checkpoint = load_checkpoint(args.resume) if getattr(args, "resume", "") else None
    s = resolve_settings(args, checkpoint and checkpoint["args"], detect_machine(), dataset_facts)
    proc, device = start(s)
    num_classes = s.num_classes + 1  # background + foreground classes
    last_epoch = s.epochs if s.stop_epoch is None else min(s.epochs, s.stop_epoch + 1)
    # Made before any work: a missing tensorboard package stops the run before the output folder exists.
    pictures = TrainingPictures(s.output_dir, plots=s.plots, tensorboard=s.tensorboard, resumed=bool(s.resume),
                                last_epoch=last_epoch, tile_size=s.val_tile_size,
                                multiple=src.model_spec(s.model).size_multiple, debug=s.debug)

    # 1. Data
    train_loader, val_loaders = build_data_loaders(s, proc, device)

    # 2. Model (a resumed run takes its weights from the checkpoint: no backbone or initial weights needed)
    model = create_model(num_classes, s.base_c, s.model, "" if checkpoint else s.pretrained_backbone)
    if s.init_weights and not checkpoint and not s.test_only:
        print(init_weights(model, s.init_weights))
    model.to(device)
    if s.test_only:
        return evaluate_checkpoint(s, model, checkpoint, val_loaders, device)

    # 3. Optimiser, schedule and precision (DDP and/or torch.compile wrap the same module for training)
    amp_dtype = getattr(torch, s.amp_dtype) if s.amp else None
    train_model, optimizer, lr_scheduler, scaler = prepare_training(s, model, proc, device, len(train_loader),
                                                                    amp_dtype)

    # 4. Resume
    start_epoch, best_dice = s.start_epoch, 0.0
    if checkpoint is not None:
        start_epoch, best_dice = resume(checkpoint, s.resume, model, optimizer, lr_scheduler, scaler,
                                        rank=proc.rank, world_size=proc.world_size)
        print(f"resuming '{s.resume}' at epoch {start_epoch} (best dice {best_dice:.3f})")
        del checkpoint

    # 5. The epochs: train, validate, log, save
    require_checkpoint_space(s.output_dir, model, optimizer, s.save_best, start_epoch)
    log = EpochLog(s.output_dir, utils.is_main_process(), start_epoch, last_epoch, s.epochs, resumed=bool(s.resume))
    # The pictures close the TensorBoard log when training ends; the writer writes the last checkpoints first.
    with pictures, CheckpointWriter() as writer:
        for epoch in range(start_epoch, last_epoch):
            if hasattr(train_loader.sampler, "set_epoch"):  # DDP's sampler, BalancedSampler
                train_loader.sampler.set_epoch(epoch)
            epoch_start = time.time()
            mean_loss, lr = train_one_epoch(train_model, optimizer, train_loader, device, epoch, num_classes,
                                            lr_scheduler=lr_scheduler, print_freq=s.print_freq, scaler=scaler,
                                            amp_dtype=amp_dtype, channels_last=s.channels_last,
                                            skeleton_recall=s.skeleton_recall)
            utils.broadcast_buffers(model)  # every process validates and saves rank 0's BatchNorm statistics
            result = record = None  # --eval-every N: the last epoch is always validated
            if (epoch + 1) % s.eval_every == 0 or epoch == last_epoch - 1:
                result = validate_and_print(s, model, val_loaders, device, num_classes)
                record = log.write(epoch, mean_loss, lr, result, epoch_start)
            is_best = result is not None and result.dice > best_dice
            best_dice = max(best_dice, result.dice) if is_best else best_dice
            save_epoch(s.output_dir, model, optimizer, lr_scheduler, scaler, epoch, best_dice, is_best, s, writer)
            if record is not None:
                pictures.after_epoch(record)
            if is_best:
                pictures.after_best(epoch, model, val_loaders[0][1].dataset, device)
    print(f"training time {datetime.timedelta(seconds=int(time.time() - log.start))}; "
          f"best dice coefficient: {best_dice:.3f}")
    if proc.distributed:
        torch.distributed.barrier()


def start(s):
    """Start the processes (torchrun's environment decides), seed, and say where the run goes."""
    proc = argparse.Namespace(device=s.device, dist_url=s.dist_url, dist_timeout=s.dist_timeout)
    utils.init_distributed_mode(proc)
    device = utils.resolve_device(s.device, local_rank=proc.gpu, distributed=proc.distributed)
    print(f"using {device.type} device" + (f" {device}" if device.type == "cuda" else "")
          + (f", {proc.world_size} processes ({proc.dist_backend})" if proc.distributed else ""))
    print(s.describe())
    if s.seed is not None:
        seed_everything(s.seed + proc.rank)
    if s.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return proc, device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_output_dir(path):
    """Create ``path`` and prove it is writable, before hours of training depend on it; remove the
    temporary checkpoint files a killed run may have left behind."""
    ensure_writable_folder(path, f"--output-dir '{path}'")
    for name in os.listdir(path):
        if name.startswith(".") and ".pth.tmp" in name:
            os.remove(os.path.join(path, name))


def prepare_training(s, model, proc, device, steps_per_epoch, amp_dtype):
    """(the module the training step runs, optimiser, LR schedule, gradient scaler).

    The step runs ``model`` (in channels_last if asked) under DDP (with
    SyncBatchNorm if asked) and/or torch.compile; the wrappers share
    ``model``'s parameters, so ``model`` is what is validated and saved. The
    scaler is enabled for float16 only.
    """
    print(f"training in {s.amp_dtype + ' autocast' if s.amp else 'float32'}, "
          f"{'channels_last' if s.channels_last else 'NCHW'}")
    if s.channels_last:
        model.to(memory_format=torch.channels_last)  # in place: the parameters stay the optimiser's
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], s.opt, s.lr, s.momentum,
                                s.weight_decay)
    lr_scheduler = create_lr_scheduler(optimizer, steps_per_epoch, s.epochs, warmup=True, schedule=s.lr_schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if proc.distributed and s.sync_bn:
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:  # torch's SyncBatchNorm runs on GPUs only
            print("note: --sync-bn is ignored on the CPU (SyncBatchNorm needs CUDA)")
    if proc.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return (torch.compile(model) if s.compile else model), optimizer, lr_scheduler, scaler


def validate_and_print(s, model, val_loaders, device, num_classes, per_image=False):
    """Validation as the settings ask for it (float32, BatchNorm folded, flips, tiles), printed as the
    tutorial's block, ``dice coefficient: x`` and the vessel metrics: once, or per dataset and their mean."""
    results = []
    for name, loader in val_loaders:
        if len(val_loaders) > 1:
            print(f"dataset {name}:")
        results.append((name, validate(model, loader, device, num_classes, tta=s.eval_tta, tile_size=s.val_tile_size,
                                       multiple=src.model_spec(s.model).size_multiple,
                                       channels_last=s.eval_channels_last, per_image=per_image,
                                       av=DATASETS[name].av)))
        results[-1][1].report()
    if len(results) == 1:
        return results[0][1]
    result = DatasetResults(results)
    print(result.summary_line())
    return result


def evaluate_checkpoint(s, model, checkpoint, val_loaders, device):
    """``--test-only``: the checkpoint's weights on the test split(s), printed and written to test_metrics.csv."""
    resume(checkpoint, s.resume, model)
    print(f"loaded '{s.resume}' (epoch {checkpoint.get('epoch', '?')})")
    result = validate_and_print(s, model, val_loaders, device, s.num_classes + 1, per_image=True)
    if utils.is_main_process():
        print(f"per-image metrics: '{write_test_metrics(s.output_dir, result, dataset=val_loaders[0][0])}'")


class EpochLog:
    """The tutorial's results file and ``log.jsonl``: one block and one JSON line per validated epoch, and a
    progress line with the time left."""

    def __init__(self, output_dir, enabled, first_epoch, last_epoch, epochs, resumed=False):
        self.enabled = enabled
        self.start = time.time()
        self.results_file = os.path.join(output_dir, "results{}.txt".format(
            datetime.datetime.now().strftime("%Y%m%d-%H%M%S")))
        self.jsonl = os.path.join(output_dir, "log.jsonl")
        if enabled:  # one record per epoch: a resumed run drops those it trains again, a new run starts anew
            restart_epoch_log(self.jsonl, first_epoch, resumed)
        # This process trains epochs [first_epoch, last_epoch) of the ``epochs`` of the schedule.
        self.first_epoch, self.last_epoch, self.epochs = first_epoch, last_epoch, epochs

    def write(self, epoch, mean_loss, lr, result, epoch_start):
        """Write the epoch's block and record, and print the progress line; returns the record (None on other
        processes).

        ``epoch_time`` is this epoch's training and validation; ``elapsed`` the seconds since this process's
        first epoch began (every epoch since, also those not validated under ``--eval-every``).
        """
        if not self.enabled:
            return None
        now = time.time()
        append_text(self.results_file, f"[epoch: {epoch}]\ntrain_loss: {mean_loss:.4f}\nlr: {lr:.6f}\n{result.text()}\n")
        record = {"epoch": epoch, "train_loss": mean_loss, "lr": lr, **result.record(),
                  "epoch_time": now - epoch_start, "elapsed": now - self.start}
        append_text(self.jsonl, json.dumps(json_safe(record), allow_nan=False) + "\n")
        print(self.progress(epoch, now - self.start), flush=True)
        return record

    def progress(self, epoch, elapsed):
        """``epoch 3/50 done: 0:01:12 elapsed, about 0:18:40 left``: the time left until the run's last epoch,
        at the mean pace of this process's epochs so far (validation included)."""
        done = epoch + 1 - self.first_epoch
        left = elapsed / done * (self.last_epoch - epoch - 1)
        return (f"epoch {epoch + 1}/{self.epochs} done: {datetime.timedelta(seconds=round(elapsed))} elapsed, "
                f"about {datetime.timedelta(seconds=round(left))} left")


def json_safe(value):
    """NaN/inf as null, recursively: a split without vessels has no AUC or vessel IoU, and strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def cli(args):
    """Run ``main`` on the parsed flags: one-line errors, and the process group closed whatever happens."""
    try:
        run_cli(main, args, debug=getattr(args, "debug", False))
    except SystemExit as e:
        if e.code:  # failed: an output folder this run created and wrote nothing in goes again
            remove_new_empty_folders()
        raise
    finally:
        utils.cleanup_distributed()


if __name__ == "__main__":
    cli(cli_args)
