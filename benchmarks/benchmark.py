"""Side-by-side speed and memory of the original tutorial's code path (a) and the project's defaults (b).

    python benchmarks/benchmark.py                     # full run on synthetic DRIVE-sized data (~4.5 min on 2 idle cores)
    python benchmarks/benchmark.py --quick             # smoke run (~2 min)
    python benchmarks/benchmark.py --workers-b 2       # (b) with 2 DataLoader worker processes
    python benchmarks/benchmark.py --data-path /path/to/DRIVE-root --json out.json
    python benchmarks/benchmark.py --device cuda --amp --compile   # (b) with AMP / torch.compile on a GPU

(a) is ``benchmarks/reference.py``: the tutorial's per-image, per-class dice
loop with ``if sets_sum == 0`` host syncs, NCHW float32, every sample decoded
from disk with PIL and augmented as a PIL image, ``ConfusionMatrix`` with
boolean indexing + ``bincount`` and ``DiceCoefficient`` per batch.
(b) is what ``train.py`` runs by default (its own helpers decide): the cached
``DriveDataset`` with the v2 transforms, the vectorised dice, training in
channels_last on CUDA only (NCHW on the CPU, where channels_last BatchNorm
statistics are less exact), validation on a copy with BatchNorm folded into
the convolutions in channels_last, device-side metrics (``train_one_epoch``
and ``train.report_validation``, which adds the vessel metrics). Each uses its
own script's DataLoader worker rule in the epoch: the original's
min(cpus, batch, 8), train.py's none on the CPU (``--workers-a`` /
``--workers-b`` override them).

Both use the project's ``UNet`` with the same initial weights. Timings are
medians over repeats, with the two configurations interleaved (and their
order alternated) so that background load hits both alike. Peak memory is
measured in separate spawned processes per configuration (each its own VmHWM /
ru_maxrss), running that configuration's training steps only; the median of
``--memory-repeats`` processes is reported, since the allocator moves a single
run's peak by about +-100 MB.
This is a benchmark, not a test: it prints numbers and ratios.
"""
import argparse
import contextlib
import copy
import io
import json
import multiprocessing as mp
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, Subset  # noqa: E402

import reference as ref  # noqa: E402
from my_dataset import DriveDataset, write_synthetic_drive  # noqa: E402
from src.unet import UNet  # noqa: E402
from train_utils import distributed_utils as utils  # noqa: E402
from train_utils.train_and_eval import (autocast_dtype, create_lr_scheduler, criterion,  # noqa: E402
                                        train_one_epoch)
from train_utils.inference import inference_model  # noqa: E402
from train_utils.transforms import get_transform  # noqa: E402
import train  # noqa: E402

NUM_CLASSES = 2  # background + vessel, as train.py's default --num-classes 1


# ---------------------------------------------------------------------------
# command line


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", default=None,
                        help="folder that holds DRIVE/ (default: synthetic 584x565 data written to a temp folder)")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer repeats and images")
    parser.add_argument("--repeats", type=int, default=None, help="timed training steps per config (default 5; quick 2)")
    parser.add_argument("--epoch-repeats", type=int, default=None, help="timed epochs per config (default 3; quick 1)")
    parser.add_argument("--images", type=int, default=None,
                        help="training images per epoch (default 8; quick 4)")
    parser.add_argument("--val-images", type=int, default=None,
                        help="full-size validation images per epoch (default 4; quick 2)")
    parser.add_argument("--loader-images", type=int, default=None,
                        help="images drawn per data-loader throughput measurement (default 32; quick 16)")
    parser.add_argument("-b", "--batch-size", type=int, default=4)
    parser.add_argument("--crop-size", type=int, default=480)
    parser.add_argument("--base-c", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--amp", action="store_true", help="(b) only: autocast (fp16 on CUDA, bf16 on the CPU)")
    parser.add_argument("--compile", action="store_true", help="(b) only: torch.compile the model")
    parser.add_argument("--channels-last", default=None, action=argparse.BooleanOptionalAction,
                        help="(b) only: force channels_last on (or off) for training and validation; default: "
                             "train.py's rule (training on CUDA only, validation always)")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch intra-op threads (default: torch's default here, {torch.get_num_threads()})")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers in the epoch, both configs")
    parser.add_argument("--workers-a", type=int, default=None,
                        help="(a)'s workers (default: the original's min(cpus, batch if batch > 1 else 0, 8))")
    parser.add_argument("--workers-b", type=int, default=None,
                        help="(b)'s workers (default: train.py's rule, 0 on the CPU; "
                             "its validation loader takes at most 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-config peak-memory processes")
    parser.add_argument("--memory-repeats", type=int, default=None,
                        help="peak-memory processes per config, medians reported (default 3; quick 1): "
                             "glibc's allocator moves one run's peak by about +-100 MB")
    parser.add_argument("--json", default=None, metavar="OUT", help="write every sample and summary here")
    return parser


def fill_defaults(args):
    quick = args.quick
    defaults = dict(repeats=(2, 5), epoch_repeats=(1, 3), images=(4, 8), val_images=(2, 4), loader_images=(16, 32),
                    memory_repeats=(1, 3))
    for name, (q, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, q if quick else full)
    args.mem_steps = 1 if quick else 2
    args.breakdown_repeats = 1 if quick else 3
    if args.threads is None:
        args.threads = torch.get_num_threads()
    cpus = os.cpu_count() or 1
    if args.workers_a is None:
        args.workers_a = args.workers if args.workers is not None else min(
            cpus, args.batch_size if args.batch_size > 1 else 0, 8)
    if args.workers_b is None:
        args.workers_b = train.default_workers(torch.device(args.device), args.batch_size, args.workers)
    args.train_channels_last = train.default_train_channels_last(torch.device(args.device), args.channels_last)
    args.eval_channels_last = args.channels_last is not False
    if min(args.workers_a, args.workers_b) < 0:
        sys.exit("error: worker counts must be >= 0")
    for name in ("repeats", "epoch_repeats", "images", "val_images", "loader_images", "batch_size", "crop_size",
                 "base_c", "threads", "memory_repeats"):
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name.replace('_', '-')} must be at least 1")
    if args.images < args.batch_size:
        sys.exit("error: --images must be at least --batch-size")
    return args


# ---------------------------------------------------------------------------
# helpers


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def proc_status_kb(field):
    """VmRSS / VmHWM of this process in kB (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def quiet():
    """Swallow the project's progress lines (MetricLogger prints every step)."""
    return contextlib.redirect_stdout(io.StringIO())


def new_model(args, device, config):
    """The project's UNet with weights from ``args.seed``; NCHW for (a), channels_last for (b) (by default)."""
    torch.manual_seed(args.seed)
    model = UNet(in_channels=3, num_classes=NUM_CLASSES, bilinear=True, base_c=args.base_c).to(device)
    if config == "b" and args.train_channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def new_optimizer(model, steps_per_epoch):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    return optimizer, create_lr_scheduler(optimizer, steps_per_epoch, epochs=1000, warmup=True)


def datasets(args, root, config):
    """(train dataset, val dataset) of a config, cut to ``--images`` / ``--val-images``."""
    if config == "a":
        train = ref.DriveDataset(root, True, ref.get_transform(True, crop_size=args.crop_size))
        val = ref.DriveDataset(root, False, ref.get_transform(False))
    else:
        train = DriveDataset(root, True, get_transform(True, crop_size=args.crop_size))
        val = DriveDataset(root, False, get_transform(False))
    return Subset(train, range(min(args.images, len(train)))), Subset(val, range(min(args.val_images, len(val))))


def collate_of(config):
    return ref.DriveDataset.collate_fn if config == "a" else DriveDataset.collate_fn


class Config:
    """One configuration's model, optimiser and one-step function, built once in the main process."""

    def __init__(self, name, args, device, model=None):
        self.name = name
        self.device = device
        self.model = model if model is not None else new_model(args, device, name)
        steps = -(-args.images // args.batch_size)
        self.optimizer, self.scheduler = new_optimizer(self.model, steps)
        self.amp_dtype = autocast_dtype(device, True) if (name == "b" and args.amp) else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.run_model = self.model
        if name == "b" and args.compile:
            self.run_model = torch.compile(self.model)
        self.loss_weight = torch.as_tensor([1.0, 2.0], device=device)
        self.channels_last = name == "b" and args.train_channels_last
        self.eval_channels_last = name == "b" and args.eval_channels_last

    def train(self, loader):
        """One pass of this config's training loop over ``loader``; returns the mean loss."""
        if self.name == "a":
            loss, _ = ref.train_one_epoch(self.run_model, self.optimizer, loader, self.device, NUM_CLASSES,
                                          self.scheduler)
        else:
            with quiet():
                loss, _ = train_one_epoch(self.run_model, self.optimizer, loader, self.device, 0, NUM_CLASSES,
                                          lr_scheduler=self.scheduler, print_freq=1000, scaler=self.scaler,
                                          amp_dtype=self.amp_dtype, channels_last=self.channels_last)
        return loss

    def validate(self, loader):
        """This config's validation over ``loader``; returns the dice."""
        if self.name == "a":
            _, dice = ref.evaluate(self.run_model, loader, self.device, NUM_CLASSES)
            return dice
        with quiet():  # as train.py validates: float32, on a BN-folded copy
            _, dice, _ = train.report_validation(self.model, loader, self.device, NUM_CLASSES,
                                                 self.eval_channels_last)
            return dice

    def step_phases(self, batch):
        """Seconds of forward, criterion, backward and optimiser step of one training step."""
        model, device = self.run_model, self.device
        model.train()
        image, target = batch[0].to(device), batch[1].to(device)
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        crit = ref.criterion if self.name == "a" else criterion
        t = [time.perf_counter()]
        with torch.autocast(device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            output = model(image)
            sync(device)
            t.append(time.perf_counter())
            loss = crit(output, target, self.loss_weight, num_classes=NUM_CLASSES, ignore_index=255)
        sync(device)
        t.append(time.perf_counter())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        sync(device)
        t.append(time.perf_counter())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        sync(device)
        t.append(time.perf_counter())
        return {k: t[i + 1] - t[i] for i, k in enumerate(("forward", "criterion", "backward", "optimizer"))}


def fixed_batch(args, root):
    """One training batch made by the reference pipeline under ``args.seed``: the same input for both configs."""
    seed_all(args.seed)
    ds = ref.DriveDataset(root, True, ref.get_transform(True, crop_size=args.crop_size))
    return ref.DriveDataset.collate_fn([ds[i % len(ds)] for i in range(args.batch_size)])


@torch.no_grad()
def loss_diagnostics(model, batch, args, device):
    """Where a first-step loss difference comes from: the criterion, the memory format, or neither.

    All on the initial weights and the fixed batch, in training mode (batch statistics), on copies
    so the timed models are untouched: the two criteria on identical logits, the NCHW model through
    the project's criterion, and a float64 forward as the exact value.
    """
    from train_utils.dice_coefficient_loss import build_target, dice_per_item
    image, target = batch[0].to(device), batch[1].to(device)
    weight = torch.as_tensor([1.0, 2.0], device=device)
    out = {}
    m = copy.deepcopy(model).train()
    logits = m(image)["out"]
    out["a_criterion_nchw"] = ref.criterion({"out": logits.clone()}, target, weight, NUM_CLASSES, ignore_index=255).item()
    out["b_criterion_nchw"] = criterion({"out": logits}, target, weight, NUM_CLASSES, ignore_index=255).item()
    m = copy.deepcopy(model).to(memory_format=torch.channels_last).train()
    logits_cl = m(image.contiguous(memory_format=torch.channels_last))["out"]
    out["b_criterion_channels_last"] = criterion({"out": logits_cl}, target, weight, NUM_CLASSES,
                                                 ignore_index=255).item()
    out["max_abs_logit_diff_channels_last_vs_nchw"] = (logits_cl - logits).abs().max().item()
    if device.type == "cpu" or torch.cuda.get_device_capability(device) >= (6, 0):
        m = copy.deepcopy(model).double().train()
        xd = m(image.double())["out"]
        ce = torch.nn.functional.cross_entropy(xd, target, weight=weight.double(), ignore_index=255)
        dice = dice_per_item(xd.softmax(1), build_target(target, NUM_CLASSES, 255), 255, 1e-6, keep_dims=2)
        out["float64"] = (ce + 1 - dice.mean(0).mean()).item()
        out["max_abs_logit_err_nchw"] = (logits.double() - xd).abs().max().item()
        out["max_abs_logit_err_channels_last"] = (logits_cl.double() - xd).abs().max().item()
    del m
    return out


# ---------------------------------------------------------------------------
# peak memory: one spawned process per configuration


def memory_child(config, args_dict, root, queue):
    try:
        args = argparse.Namespace(**args_dict)
        torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        seed_all(args.seed)
        train_ds, _ = datasets(args, root, config)
        loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, num_workers=0,
                            collate_fn=collate_of(config))
        batch = next(iter(loader))
        cfg = Config(config, args, device)
        rss_setup = proc_status_kb("VmRSS")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(1 + args.mem_steps):  # the first step allocates the caches, later ones reuse them
            cfg.train([batch])
        out = {"setup_rss_kb": rss_setup, "vmhwm_kb": proc_status_kb("VmHWM"),
               "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
        if device.type == "cuda":
            out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        queue.put(out)
    except BaseException as e:  # report, so the parent does not wait forever
        queue.put({"error": f"{type(e).__name__}: {e}"})


def measure_memory(config, args, root):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=memory_child, args=(config, vars(args), root, queue))
    proc.start()
    out = queue.get()
    proc.join()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out["rusage_children_max_kb_so_far"] = children
    if "error" in out:
        print(f"  memory ({config}) failed: {out['error']}", flush=True)
    return out


def measure_memory_repeated(args, root):
    """Each config's peak memory over ``--memory-repeats`` fresh processes (interleaved): medians and samples."""
    samples = {"a": [], "b": []}
    for r in range(args.memory_repeats):
        for name in (("a", "b") if r % 2 == 0 else ("b", "a")):
            samples[name].append(measure_memory(name, args, root))
        print("  peak MB: " + ", ".join(f"{n} {samples[n][-1].get('vmhwm_kb', 0) / 1024:.0f}" for n in "ab"),
              flush=True)
    out = {}
    for name, runs in samples.items():
        failed = [run for run in runs if "error" in run]
        if failed:
            out[name] = failed[0]
            continue
        out[name] = {k: statistics.median(run[k] for run in runs) for k, v in runs[0].items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)}
        out[name]["samples"] = runs
    return out


# ---------------------------------------------------------------------------
# the measurements


def measure_steps(cfgs, batch, args, results):
    """Training step: first-step losses (same weights, same batch), then interleaved timed steps."""
    device = cfgs["a"].device
    first, second, step_s, warm_s = {}, {}, {"a": [], "b": []}, {}
    for name in ("a", "b"):
        sync(device)
        t0 = time.perf_counter()
        first[name] = cfgs[name].train([batch])
        sync(device)
        warm_s[name] = time.perf_counter() - t0
    for name in ("a", "b"):
        second[name] = cfgs[name].train([batch])
    for r in range(args.repeats):
        for name in (("a", "b") if r % 2 == 0 else ("b", "a")):
            sync(device)
            t0 = time.perf_counter()
            cfgs[name].train([batch])
            sync(device)
            step_s[name].append(time.perf_counter() - t0)
        print(f"  step repeat {r + 1}/{args.repeats}: a {step_s['a'][-1]:.3f} s, b {step_s['b'][-1]:.3f} s", flush=True)
    results["first_step_loss"] = first
    results["second_step_loss"] = second
    results["step_s"] = step_s
    results["first_step_s"] = warm_s

    phases = {"a": [], "b": []}
    for r in range(args.breakdown_repeats):
        for name in (("a", "b") if r % 2 == 0 else ("b", "a")):
            phases[name].append(cfgs[name].step_phases(batch))
    results["phases_s"] = phases


def measure_epochs(cfgs, loaders, args, results):
    device = cfgs["a"].device
    # Warm the full-size eval shapes (oneDNN / cuDNN pick their kernels per shape) outside the timing.
    for name in ("a", "b"):
        warm = DataLoader(Subset(loaders[name][1].dataset, [0]), batch_size=1, collate_fn=collate_of(name))
        cfgs[name].validate(warm)
    train_s, val_s, dice, loss = ({"a": [], "b": []} for _ in range(4))
    for r in range(args.epoch_repeats):
        for name in (("a", "b") if r % 2 == 0 else ("b", "a")):
            train_loader, val_loader = loaders[name]
            seed_all(args.seed + r)
            sync(device)
            t0 = time.perf_counter()
            loss[name].append(cfgs[name].train(train_loader))
            sync(device)
            t1 = time.perf_counter()
            dice[name].append(cfgs[name].validate(val_loader))
            sync(device)
            t2 = time.perf_counter()
            train_s[name].append(t1 - t0)
            val_s[name].append(t2 - t1)
        print(f"  epoch repeat {r + 1}/{args.epoch_repeats}: a {train_s['a'][-1]:.2f} + {val_s['a'][-1]:.2f} s, "
              f"b {train_s['b'][-1]:.2f} + {val_s['b'][-1]:.2f} s", flush=True)
    results.update(epoch_train_s=train_s, epoch_val_s=val_s, epoch_dice=dice, epoch_loss=loss)
    results["epoch_s"] = {k: [t + v for t, v in zip(train_s[k], val_s[k])] for k in train_s}


def measure_metric_updates(cfgs, val_sets, args, results):
    """Seconds per image of the validation metric updates alone, on one model output."""
    device = cfgs["a"].device
    image, target = val_sets["b"][0]
    image, target = image.unsqueeze(0).to(device), target.unsqueeze(0).to(device)
    # Each config's own model output: (b)'s is channels_last when its model is, and some
    # reductions (argmax over the class dim) cost very differently in the two layouts.
    with torch.no_grad():
        cfgs["a"].model.eval()
        logits_a = cfgs["a"].model(image)["out"]
        model_b = inference_model(cfgs["b"].model, cfgs["b"].eval_channels_last)
        image_b = image.contiguous(memory_format=torch.channels_last) if cfgs["b"].eval_channels_last else image
        with torch.autocast(device.type, dtype=cfgs["b"].amp_dtype or torch.float32,
                            enabled=cfgs["b"].amp_dtype is not None):
            logits_b = model_b(image_b)["out"]
        logits_b = logits_b.float()
    n = 10 if args.quick else 20
    from train_utils.vessel_metrics import VesselMetrics

    def run_a():
        cm, dc = ref.ConfusionMatrix(NUM_CLASSES), ref.DiceCoefficient(NUM_CLASSES, 255)
        cm.update(target.flatten(), logits_a.argmax(1).flatten())
        dc.update(logits_a, target)

    def run_b():
        cm, dc = utils.ConfusionMatrix(NUM_CLASSES), utils.DiceCoefficient(NUM_CLASSES, 255)
        cm.update(target.flatten(), logits_b.argmax(1).flatten())
        dc.update(logits_b, target)
        sync(device)

    def run_b_vessel():
        run_b()
        VesselMetrics(255).update(logits_b, target)
        sync(device)

    out = {}
    for key, fn in (("a", run_a), ("b", run_b), ("b_with_vessel", run_b_vessel)):
        fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out[key] = ts
    results["metric_update_s"] = out


def measure_loader(train_sets, args, results):
    """Training images per second through a DataLoader with num_workers=0, one torch thread (one core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rates = {"a": [], "b": []}
    try:
        for r in range(args.repeats):
            for name in (("a", "b") if r % 2 == 0 else ("b", "a")):
                seed_all(args.seed + r)
                loader = DataLoader(train_sets[name], batch_size=args.batch_size, shuffle=True, num_workers=0,
                                    collate_fn=collate_of(name))
                count = 0
                t0 = time.perf_counter()
                while count < args.loader_images:
                    for image, _ in loader:
                        count += image.shape[0]
                        if count >= args.loader_images:
                            break
                rates[name].append(count / (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(threads)
    results["loader_img_per_s"] = rates


# ---------------------------------------------------------------------------
# report


def summarise(results, args):
    """Rows of (metric, a, b, b/a, speed-up of b, unit kind) from the raw samples."""
    rows = []

    def add(label, a, b, kind):
        ratio = b / a if a else float("nan")
        speedup = {"time": a / b if b else float("nan"), "rate": ratio}.get(kind)
        rows.append({"metric": label, "a": a, "b": b, "b_over_a": ratio, "speedup": speedup, "kind": kind})

    s = results
    add("training step (s)", median(s["step_s"]["a"]), median(s["step_s"]["b"]), "time")
    for phase in ("forward", "criterion", "backward", "optimizer"):
        add(f"  {phase} (s)", median([p[phase] for p in s["phases_s"]["a"]]),
            median([p[phase] for p in s["phases_s"]["b"]]), "time")
    add(f"epoch: train {s['n_train']} img (s)", median(s["epoch_train_s"]["a"]), median(s["epoch_train_s"]["b"]),
        "time")
    add(f"epoch: validate {s['n_val']} img (s)", median(s["epoch_val_s"]["a"]), median(s["epoch_val_s"]["b"]), "time")
    add("epoch: train + validation (s)", median(s["epoch_s"]["a"]), median(s["epoch_s"]["b"]), "time")
    add("validation (s / image)", median(s["epoch_val_s"]["a"]) / s["n_val"],
        median(s["epoch_val_s"]["b"]) / s["n_val"], "time")
    mu = s["metric_update_s"]
    add("  metric updates (s / image)", median(mu["a"]), median(mu["b_with_vessel"]), "time")
    add("  of which confmat + dice (s / image)", median(mu["a"]), median(mu["b"]), "time")
    add("data loader, 1 core (images / s)", median(s["loader_img_per_s"]["a"]), median(s["loader_img_per_s"]["b"]),
        "rate")
    mem = s.get("memory")
    if mem and "error" not in mem["a"] and "error" not in mem["b"]:
        key = "vmhwm_kb" if mem["a"].get("vmhwm_kb") else "ru_maxrss_kb"
        add(f"peak resident memory, train step (MB, median of {args.memory_repeats})", mem["a"][key] / 1024,
            mem["b"][key] / 1024, "memory")
        add("  of which setup: import, model, data (MB)", mem["a"]["setup_rss_kb"] / 1024,
            mem["b"]["setup_rss_kb"] / 1024, "memory")
        if "cuda_peak_bytes" in mem["a"]:
            add("peak CUDA memory, train step (MB)", mem["a"]["cuda_peak_bytes"] / 2 ** 20,
                mem["b"]["cuda_peak_bytes"] / 2 ** 20, "memory")
    return rows


def print_table(rows, results, args):
    w = max(len(r["metric"]) for r in rows) + 2
    print()
    print(f"{'metric':<{w}}{'(a) original':>14}{'(b) project':>14}{'b/a':>9}{'speed-up of b':>16}")
    print("-" * (w + 53))
    for r in rows:
        sp = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
        fmt = "{:14.1f}" if r["kind"] in ("memory", "rate") else "{:14.3f}"
        print(f"{r['metric']:<{w}}" + fmt.format(r["a"]) + fmt.format(r["b"]) + f"{r['b_over_a']:9.3f}{sp:>16}")
    print("(speed-up of b = a/b for times, b/a for images per second; memory has none)")
    fl, sl = results["first_step_loss"], results["second_step_loss"]
    diff = abs(fl["a"] - fl["b"])
    tol_applies = not args.amp
    print()
    print(f"first-step loss:  (a) {fl['a']:.6f}  (b) {fl['b']:.6f}  |diff| {diff:.2e}"
          + (f"  ({'OK' if diff <= 1e-4 else 'MISMATCH'}: tolerance 1e-4 in fp32)" if tol_applies
             else "  (AMP: no fp32 tolerance applies)"))
    print(f"second-step loss: (a) {sl['a']:.6f}  (b) {sl['b']:.6f}  |diff| {abs(sl['a'] - sl['b']):.2e}"
          "  (after one SGD update of each)")
    lc = results.get("loss_check")
    if lc:
        print("  where a difference comes from (initial weights, same batch, training-mode BN):")
        print(f"    (a) and (b) criteria on the same NCHW logits: {lc['a_criterion_nchw']:.6f} vs "
              f"{lc['b_criterion_nchw']:.6f}  |diff| {abs(lc['a_criterion_nchw'] - lc['b_criterion_nchw']):.2e}")
        print(f"    (b) criterion, channels_last model: {lc['b_criterion_channels_last']:.6f}  "
              f"|diff to NCHW| {abs(lc['b_criterion_channels_last'] - lc['b_criterion_nchw']):.2e}; "
              f"max |logit diff| {lc['max_abs_logit_diff_channels_last_vs_nchw']:.2e}")
        if "float64" in lc:
            print(f"    float64 forward + loss: {lc['float64']:.6f}  |err| NCHW fp32 "
                  f"{abs(lc['b_criterion_nchw'] - lc['float64']):.2e}, channels_last fp32 "
                  f"{abs(lc['b_criterion_channels_last'] - lc['float64']):.2e}; max |logit err| NCHW "
                  f"{lc['max_abs_logit_err_nchw']:.2e}, channels_last {lc['max_abs_logit_err_channels_last']:.2e}")
    print(f"epoch dice (last repeat): (a) {results['epoch_dice']['a'][-1]:.4f}  (b) {results['epoch_dice']['b'][-1]:.4f}")
    if args.compile:
        print(f"(b) torch.compile: first step {results['first_step_s']['b']:.1f} s vs median "
              f"{median(results['step_s']['b']):.2f} s: compile ~ "
              f"{results['first_step_s']['b'] - median(results['step_s']['b']):.1f} s")
    print(f"(b) one-off DriveDataset cache build ({results['n_cached']} train + val files decoded): "
          f"{results['cache_build_s']:.2f} s")

    by = {r["metric"].strip(): r for r in rows}
    checks = [("one epoch >= 1.4x faster", by["epoch: train + validation (s)"]["speedup"] >= 1.4),
              ("validation >= 1.5x faster per image", by["validation (s / image)"]["speedup"] >= 1.5)]
    mem_row = next((row for label, row in by.items() if label.startswith("peak resident memory")), None)
    if mem_row:
        checks.append(("peak memory of (b) not above (a)", mem_row["b"] <= mem_row["a"]))
    print()
    for label, ok in checks:
        print(f"target: {label}: {'met' if ok else 'NOT met'}")
    return checks


# ---------------------------------------------------------------------------


def main():
    args = fill_defaults(get_args_parser().parse_args())
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda asked for but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        sys.exit("error: --device must be cpu or cuda[:N]")
    torch.set_num_threads(args.threads)
    results = {"load_start": os.getloadavg()}
    t_start = time.perf_counter()

    tmp = None
    if args.data_path:
        root = args.data_path
        if not os.path.isdir(os.path.join(root, "DRIVE")):
            sys.exit(f"error: '{root}' holds no DRIVE/ folder")
        data_desc = f"{root}"
    else:
        tmp = tempfile.TemporaryDirectory(prefix="unet-bench-")
        root = tmp.name
        t0 = time.perf_counter()
        write_synthetic_drive(root, num_train=args.images, num_test=args.val_images, height=584, width=565,
                              seed=args.seed)
        data_desc = f"synthetic 584x565 (write_synthetic_drive, seed {args.seed}) in {root}, " \
                    f"written in {time.perf_counter() - t0:.1f} s"

    print(f"torch {torch.__version__}, {platform.python_version()}, device {device}, threads {args.threads}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, load avg {results['load_start']}")
    print(f"data: {data_desc}")
    print(f"batch {args.batch_size}, crop {args.crop_size}, base_c {args.base_c}, seed {args.seed}; "
          f"(b): train {'channels_last' if args.train_channels_last else 'NCHW'}, validate "
          f"{'channels_last' if args.eval_channels_last else 'NCHW'} with BatchNorm folded"
          f"{', AMP ' + str(autocast_dtype(device, True)) if args.amp else ', fp32'}"
          f"{', torch.compile' if args.compile else ''}; (a): NCHW fp32")

    if not args.no_memory:
        print("peak memory: one spawned process per config ...", flush=True)
        results["memory"] = measure_memory_repeated(args, root)

    # Both models from the same initial weights; (b) converted to channels_last.
    model_a = new_model(args, device, "a")
    batch = fixed_batch(args, root)
    print("first-step loss diagnostics ...", flush=True)
    results["loss_check"] = loss_diagnostics(model_a, batch, args, device)
    model_b = copy.deepcopy(model_a)
    if args.train_channels_last:
        model_b = model_b.to(memory_format=torch.channels_last)
    cfgs = {"a": Config("a", args, device, model_a), "b": Config("b", args, device, model_b)}

    t0 = time.perf_counter()
    sets = {name: datasets(args, root, name) for name in ("a", "b")}
    results["cache_build_s"] = time.perf_counter() - t0  # (a) builds nothing but file lists
    results["n_cached"] = len(sets["b"][0].dataset) + len(sets["b"][1].dataset)
    results["n_train"], results["n_val"] = len(sets["b"][0]), len(sets["b"][1])
    print(f"epoch: {results['n_train']} training images (batch {args.batch_size}; loader workers: "
          f"(a) {args.workers_a}, (b) {args.workers_b} train / {min(args.workers_b, 2)} val) + "
          f"{results['n_val']} full-size validation images (batch 1); {args.epoch_repeats} repeat(s); "
          f"training step: {args.repeats} repeat(s)", flush=True)

    print("training steps ...", flush=True)
    measure_steps(cfgs, batch, args, results)

    pin = device.type == "cuda"
    loaders = {}
    for name in ("a", "b"):
        train_ds, val_ds = sets[name]
        workers = args.workers_a if name == "a" else args.workers_b
        loaders[name] = (
            DataLoader(train_ds, batch_size=args.batch_size, sampler=RandomSampler(train_ds),
                       num_workers=workers, pin_memory=pin, collate_fn=collate_of(name)),
            DataLoader(val_ds, batch_size=1, sampler=SequentialSampler(val_ds),
                       num_workers=workers if name == "a" else min(workers, 2), pin_memory=pin,
                       collate_fn=collate_of(name)),
        )
    print("epochs ...", flush=True)
    measure_epochs(cfgs, loaders, args, results)
    print("metric updates, data loader ...", flush=True)
    measure_metric_updates(cfgs, {k: v[1] for k, v in sets.items()}, args, results)
    measure_loader({k: v[0] for k, v in sets.items()}, args, results)

    results["load_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - t_start
    rows = summarise(results, args)
    checks = print_table(rows, results, args)
    print(f"\nload avg at start {results['load_start']}, at end {results['load_end']}; "
          f"wall {results['wall_s']:.0f} s")

    if args.json:
        payload = {"args": {k: v for k, v in vars(args).items()}, "data": data_desc,
                   "torch": torch.__version__, "rows": rows, "targets": dict(checks), "raw": results}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1, default=float)
        print(f"wrote {args.json}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
