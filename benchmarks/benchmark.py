"""Side-by-side speed and memory of the tutorial's training run (a) and this project's train.py (b), as users run them;
and the dice against wall time of the two recipes (``--mode recipes``).

    python benchmarks/benchmark.py                             # epochs on synthetic DRIVE-sized data (~10 min, 2 cores)
    python benchmarks/benchmark.py --rounds 1 --images 4 --val-images 2       # a quicker look
    python benchmarks/benchmark.py --data-path ROOT            # real images (a folder holding DRIVE/)
    python benchmarks/benchmark.py --configs a b b-glibc       # also train.py with glibc's malloc
    python benchmarks/benchmark.py --configs b b-device        # train.py's loader against --data-on-device
    python benchmarks/benchmark.py --device cuda --b-args="--amp"            # on a GPU, (b) with AMP
    python benchmarks/benchmark.py --mode allocators           # one training step under each memory allocator
    python benchmarks/benchmark.py --mode precision -b 4 --crop-size 256 --opt adamw   # float32 / bfloat16 step
    python benchmarks/benchmark.py --mode recipes --data-path ROOT --plot docs/recipes.png   # --recipe fast vs tutorial
    python benchmarks/benchmark.py --mode photos               # the fast recipe's epoch on large photographs
    python benchmarks/benchmark.py --mode compile              # each recipe's step eager and under torch.compile
    python benchmarks/benchmark.py --mode predict              # predict.py's photographs per minute on a folder

``--mode epoch`` runs whole processes, one configuration at a time, each as
a user would start it: (a) is ``benchmarks/reference.py``, the tutorial's
``train.py`` rewritten (PIL transforms decoded from disk per sample, the
tutorial's per-image dice loop, its loader workers min(cpus, batch, 8),
``pin_memory``, glibc's malloc, NCHW float32); (b) is ``train.py`` with its
defaults (its memory allocator, no loader processes on the CPU, cached
decoded images, BatchNorm-folded validation). An epoch is one pass over the
training images plus validation. Each configuration runs for 1 and for
``--epochs`` epochs; the steady-state epoch time is the difference divided by
the extra epochs, so start-up (imports, decoding, the first step's
allocations) does not count. Configurations are interleaved, their order
alternated by round, and medians over rounds are printed. Peak memory is the
largest resident set of any process of the longer run (its ``ru_maxrss``).

``--mode predict`` runs predict.py on a folder of ``--images`` synthetic
photographs of each ``--photo-sizes`` (JPEGs), as whole processes, with the
shipped model: the predict.py of ``--baseline`` (a git revision, checked out
in a temporary worktree: one photograph after another, as it was before
folder runs read ahead and wrote behind) against this checkout's, with its
defaults (on the CPU one thing at a time), with ``--workers 1`` (a thread
reading ahead and one writing behind), with ``--measure``, as two torchrun
processes and with ``--amp``, interleaved over ``--rounds``. It prints photographs per minute
(from each run's own "predicted N images in T s", so the start-up does not
count), the ratio to the baseline and the peak resident memory.

``--mode allocators`` times one training step of the tutorial's model
(batch 4, crop 480, base_c 32) in a fresh process per allocator: step time,
system time, minor page faults and peak memory.

``--mode precision`` times one training step on the CPU, likewise one fresh
process per configuration: float32 and bfloat16 autocast, each in NCHW and
channels_last (``-b 4 --crop-size 256 --opt adamw`` is the fast recipe's
step). bfloat16 is only faster on CPUs with bfloat16 hardware (AMX,
AVX512-BF16), which the mode reports.

``--mode recipes`` runs ``train.py --recipe tutorial --epochs 25`` and then
``train.py --recipe fast`` (same data, seed 0, one after the other, never
together: they share the cores), reads each run's ``log.jsonl`` and draws
the validation dice against the run's cumulative wall time (training,
validation and checkpoints; ``elapsed`` in the log, start-up excluded), with
the dice target and the time of the tutorial's 25 epochs marked. It prints a
markdown table (final dice and AUC of the last epoch's model, time to reach
the target) and writes it with every point to ``--json``.

``--mode photos`` trains ``--recipe fast`` as train.py does on this CPU (its
precision, width and memory format; no loader processes) on synthetic
photographs of each ``--photo-sizes`` (CHASE_DB1's 960 x 999 and HRF's
2336 x 3504 by default), ``--images`` of them, 4 crops each per epoch, one
fresh process per geometry sampler, interleaved: ``chain`` resizes and
rotates the whole photograph, then crops (the preset with
``crop_first=False``: whole-image transforms one after the other, as the
tutorial's preset runs them), ``crop-first`` is train.py's, and
``crop-first+worker`` adds one loader process. It prints the steady epoch
(epochs after the first), the seconds the steps waited for data, their share
of the epoch, and ratios against the first sampler.

``--mode compile`` times each recipe's training step on this CPU (the
tutorial's; the fast recipe's at the precision and width train.py gives it
here) eager and under ``torch.compile``, from the same weights and batch: the
steady step, the extra time of the first (compilation), the steps it takes to
pay that back, and the largest relative difference between the two runs'
losses.

This is a benchmark, not a test: it prints numbers and ratios.
"""
import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# predict.py before folder runs that finish, resume, read ahead and write behind: "today's" for --mode predict.
PREDICT_BASELINE = "fadfadd07053a773f989de3c89e355e85e687f15"
sys.path.insert(0, ROOT)

from train_utils.allocator import find_mimalloc, find_tcmalloc  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="epoch", choices=["epoch", "allocators", "precision", "recipes", "photos",
                                                            "compile", "predict"])
    parser.add_argument("--data-path", default=None,
                        help="folder that holds DRIVE/ (default: synthetic 584x565 images in a temp folder)")
    parser.add_argument("--configs", nargs="+", default=["a", "b"],
                        help="a (tutorial), b (train.py), b-device (train.py --data-on-device), b-glibc / "
                             "b-mimalloc / b-tcmalloc (train.py with that UNET_ALLOCATOR)")
    parser.add_argument("--b-args", default="", help="extra train.py flags for every b config, e.g. '--amp'")
    parser.add_argument("--rounds", default=2, type=int, help="interleaved rounds (medians over rounds)")
    parser.add_argument("--epochs", default=None, type=int,
                        help="the longer run's epochs (the shorter runs 1); default 3 on the CPU, 12 on a GPU, "
                             "where an epoch is short next to the seconds a process takes to start")
    parser.add_argument("--images", default=8, type=int, help="synthetic training images")
    parser.add_argument("--val-images", default=4, type=int, help="synthetic validation images")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", default=3, type=int, help="--mode allocators / precision: timed steps per process")
    parser.add_argument("--crop-size", default=480, type=int)
    parser.add_argument("--base-c", default=32, type=int)
    parser.add_argument("-b", "--batch-size", default=4, type=int)
    parser.add_argument("--json", default=None, metavar="OUT", help="write every sample here")
    parser.add_argument("--plot", default="recipes.png", help="--mode recipes: the picture (PNG) to write")
    parser.add_argument("--target", default=0.80, type=float, help="--mode recipes: the dice target line")
    parser.add_argument("--tutorial-epochs", default=25, type=int, help="--mode recipes: the tutorial run's epochs")
    parser.add_argument("--train-args", default="",
                        help="--mode recipes: extra train.py flags for both runs (they override both recipes)")
    parser.add_argument("--fast-args", default="", help="--mode recipes: extra train.py flags for the fast run")
    parser.add_argument("--image-size", default=[584, 565], type=int, nargs=2, metavar=("H", "W"),
                        help=argparse.SUPPRESS)  # synthetic image size; the tests make it tiny
    parser.add_argument("--opt", default="sgd", choices=["sgd", "adamw"],
                        help="--mode allocators / precision: the optimiser of the timed step (adamw: the fast recipe's)")
    parser.add_argument("--photo-sizes", nargs="+", default=None, metavar="HxW",
                        help="--mode photos / predict: synthetic photograph sizes (default CHASE_DB1's and HRF's; "
                             "predict: DRIVE's and CHASE_DB1's)")
    parser.add_argument("--samplers", nargs="+", default=["chain", "crop-first"],
                        help="--mode photos: chain (whole-image resize and rotation, then the crop), crop-first "
                             "(train.py's), crop-first+worker (one loader process)")
    parser.add_argument("--baseline", default=PREDICT_BASELINE, metavar="REV",
                        help="--mode predict: the git revision whose predict.py is the baseline (default: the last "
                             "one before folder runs that resume and read ahead)")
    parser.add_argument("--predicts", nargs="+",
                        default=["baseline", "new", "new-workers1", "new-measure", "new-2proc", "new-amp"],
                        help="--mode predict: which runs (baseline, new, new-workers1: a thread reading ahead and one "
                             "writing behind, new-measure, new-2proc: "
                             "torchrun's two single-thread processes, new-amp: autocast, bfloat16 on the CPU)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-epochs", default=None, help=argparse.SUPPRESS)  # a photos child: its data folder
    parser.add_argument("--child-sampler", default="crop-first", help=argparse.SUPPRESS)
    parser.add_argument("--child-compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-dtype", default="float32", choices=["float32", "bfloat16"], help=argparse.SUPPRESS)
    parser.add_argument("--child-channels-last", action="store_true", help=argparse.SUPPRESS)
    return parser


def clean_env(**extra):
    """This environment without any allocator choice or preload, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UNET_ALLOCATOR", "MIMALLOC_"))}
    env.pop("LD_PRELOAD", None)
    env.update(extra)
    return env


def run_measured(argv, env):
    """Run a command to its end; (wall seconds, peak RSS in MB of its largest process). Fails loudly."""
    t = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(argv)} failed ({proc.returncode}):\n{out[-3000:]}")
    return wall, usage.ru_maxrss / 1024, out


# ---------------------------------------------------------------------------
# --mode epoch


def epoch_command(config, args, root, epochs, out_dir):
    """(argv, env) that start ``config`` for ``epochs`` epochs."""
    common = ["--data-path", root, "--epochs", str(epochs), "-b", str(args.batch_size), "--base-c", str(args.base_c),
              "--crop-size", str(args.crop_size), "--device", args.device, "--output-dir", out_dir]
    if config == "a":
        return [sys.executable, os.path.join(HERE, "reference.py"), *common], clean_env()
    allocator = {"b-glibc": "system", "b-mimalloc": "mimalloc", "b-tcmalloc": "tcmalloc"}.get(config, "auto")
    device_data = ["--data-on-device"] if config == "b-device" else []
    argv = [sys.executable, os.path.join(ROOT, "train.py"), *common, "--print-freq", "1000", *device_data,
            *args.b_args.split()]
    return argv, clean_env(UNET_ALLOCATOR=allocator)


def run_epochs(args, root):
    samples = {c: [] for c in args.configs}
    for r in range(args.rounds):
        order = args.configs if r % 2 == 0 else args.configs[::-1]
        for config in order:
            times = {}
            for epochs in (1, args.epochs):
                with tempfile.TemporaryDirectory() as out_dir:
                    argv, env = epoch_command(config, args, root, epochs, out_dir)
                    times[epochs] = run_measured(argv, env)
            (t1, _, _), (tn, peak, out) = times[1], times[args.epochs]
            allocator = next((ln.split(":", 1)[1].split("(")[0].strip() for ln in out.splitlines()
                              if ln.startswith("memory allocator:")), "glibc")
            if tn <= t1:  # start-up jitter (CUDA, cuDNN autotuning, workers) outweighed the extra epochs
                sys.exit(f"error: {config}: {args.epochs} epochs took {tn:.1f} s, no longer than 1 epoch "
                         f"({t1:.1f} s): too few epochs to measure one; raise --epochs")
            sample = {"epoch_s": (tn - t1) / (args.epochs - 1), "t1": t1, "tn": tn, "peak_mb": peak,
                      "allocator": allocator}
            samples[config].append(sample)
            print(f"round {r + 1} {config}: epoch {sample['epoch_s']:.2f} s (T1 {t1:.1f} s, T{args.epochs} "
                  f"{tn:.1f} s), peak {peak:.0f} MB, allocator {allocator}", flush=True)
    return samples


def print_epoch_table(samples, args, train_images):
    base = statistics.median(s["epoch_s"] for s in samples[args.configs[0]])
    base_peak = statistics.median(s["peak_mb"] for s in samples[args.configs[0]])
    print(f"\n| config | epoch (s), median (range) | speed-up vs {args.configs[0]} | training images / s of epoch "
          f"| peak RSS (MB) | peak vs {args.configs[0]} |")
    print("| --- | --- | --- | --- | --- | --- |")
    for c in args.configs:
        e = [s["epoch_s"] for s in samples[c]]
        peak = statistics.median(s["peak_mb"] for s in samples[c])
        med = statistics.median(e)
        print(f"| {c} ({samples[c][0]['allocator']}) | {med:.2f} ({min(e):.2f}-{max(e):.2f}) | {base / med:.2f}x | "
              f"{train_images / med:.2f} | {peak:.0f} | {peak / base_peak:.2f} |")


# ---------------------------------------------------------------------------
# --mode allocators


def allocator_configs():
    """(label, LD_PRELOAD library or None, extra environment) for every allocator this machine has."""
    configs = [("glibc malloc", None, {})]
    tc = find_tcmalloc()
    if tc:
        configs.append((f"tcmalloc ({tc})", tc, {}))
    mi = find_mimalloc()
    if mi:
        configs.append(("mimalloc, default settings", mi, {}))
        # Faster steps, but over whole epochs a higher peak than glibc's: measured, not used.
        configs.append(("mimalloc, MIMALLOC_PURGE_DELAY=-1", mi, {"MIMALLOC_PURGE_DELAY": "-1"}))
    return configs


def step_child(args):
    """One warm-up and ``--steps`` timed training steps in this process (the optimiser, autocast dtype and memory
    format of the ``--opt`` / ``--child-*`` flags, as train.py sets them up); prints one JSON line."""
    import torch

    import src
    from train_utils.settings import RECIPES
    from train_utils.train_and_eval import build_optimizer
    from train_utils.train_and_eval import criterion

    torch.manual_seed(0)
    model = src.build_model("unet", num_classes=2, base_c=args.base_c).train()
    fast = RECIPES["fast"]  # adamw: the fast recipe's settings; sgd: the tutorial's
    lr, wd = (0.01, 1e-4) if args.opt == "sgd" else (fast["lr"], fast["weight_decay"])
    optimizer = build_optimizer(model.parameters(), args.opt, lr, 0.9, wd)
    image = torch.randn(args.batch_size, 3, args.crop_size, args.crop_size)
    target = (torch.rand(args.batch_size, args.crop_size, args.crop_size) < 0.12).long()
    target[:, :, : args.crop_size // 8] = 255  # an ignored band, as outside the FOV
    weight = torch.tensor([1.0, 2.0])
    if args.child_channels_last:
        model = model.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
    bf16 = args.child_dtype == "bfloat16"
    step_model = torch.compile(model) if args.child_compile else model
    losses = []

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = step_model(image)["out"]
            loss = criterion({"out": logits}, target, weight, num_classes=2, ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        return logits

    t = time.perf_counter()
    logits = step()  # warm-up: the optimizer's buffers, the first touch of everything (and compilation)
    first = time.perf_counter() - t
    times = []
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"step_s": statistics.median(times), "sys_s": (r1.ru_stime - r0.ru_stime) / args.steps,
                      "faults": (r1.ru_minflt - r0.ru_minflt) / args.steps, "peak_mb": r1.ru_maxrss / 1024,
                      "logits": str(logits.dtype).replace("torch.", ""), "first_s": first, "losses": losses,
                      "channels_last": logits.is_contiguous(memory_format=torch.channels_last)}))


def run_step_children(runs, rounds):
    """``runs`` is [(label, argv, env)] of step_child processes: ``rounds`` interleaved rounds, the order
    reversed every other round; returns {label: [each round's JSON sample]}."""
    samples = {label: [] for label, _, _ in runs}
    for r in range(rounds):
        for label, argv, env in (runs if r % 2 == 0 else runs[::-1]):
            _, _, out = run_measured(argv, env)
            samples[label].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1} {label}: {samples[label][-1]}", flush=True)
    return samples


def run_allocators(args):
    configs = allocator_configs()
    samples = run_step_children([(label, step_child_argv(args),
                                  clean_env(**extra, **({"LD_PRELOAD": lib} if lib else {})))
                                 for label, lib, extra in configs], args.rounds)
    base = statistics.median(x["step_s"] for x in samples[configs[0][0]])
    print("\n| allocator | s / step, median (range) | system s / step | minor page faults / step | peak RSS (MB) "
          "| step speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, _, _ in configs:
        xs = samples[label]
        med = {k: statistics.median(x[k] for x in xs) for k in ("step_s", "sys_s", "faults", "peak_mb")}
        print(f"| {label} | {med['step_s']:.2f} ({min(x['step_s'] for x in xs):.2f}-"
              f"{max(x['step_s'] for x in xs):.2f}) | {med['sys_s']:.2f} | {med['faults']:,.0f} | "
              f"{med['peak_mb']:.0f} | {base / med['step_s']:.2f}x |")
    return samples


def step_child_argv(args):
    return [sys.executable, os.path.abspath(__file__), "--child", "--steps", str(args.steps), "-b",
            str(args.batch_size), "--crop-size", str(args.crop_size), "--base-c", str(args.base_c), "--opt", args.opt]


# ---------------------------------------------------------------------------
# --mode precision

PRECISIONS = (("float32", "NCHW"), ("float32", "channels_last"), ("bfloat16", "NCHW"), ("bfloat16", "channels_last"))


def run_precisions(args):
    """One training step on the CPU in float32 and under bfloat16 autocast, each in NCHW and channels_last, with
    the allocator train.py would preload (tcmalloc when installed); ratios against float32 NCHW, the default."""
    from train_utils.precision import cpu_has_native_bf16

    lib = find_tcmalloc()
    env = clean_env(**({"LD_PRELOAD": lib} if lib else {}))
    print(f"allocator {'tcmalloc' if lib else 'glibc'}; bfloat16 hardware (AMX or AVX512-BF16): "
          f"{'yes' if cpu_has_native_bf16() else 'no'}; optimiser {args.opt}", flush=True)
    runs = [(f"{dtype}, {layout}", step_child_argv(args) + ["--child-dtype", dtype]
             + (["--child-channels-last"] if layout == "channels_last" else []), env) for dtype, layout in PRECISIONS]
    samples = run_step_children(runs, args.rounds)
    base = statistics.median(x["step_s"] for x in samples[runs[0][0]])
    print("\n| precision | memory format | s / step, median (range) | speed-up vs float32 NCHW | peak RSS (MB) |")
    print("| --- | --- | --- | --- | --- |")
    for (dtype, layout), (label, _, _) in zip(PRECISIONS, runs):
        steps = [x["step_s"] for x in samples[label]]
        med = statistics.median(steps)
        peak = statistics.median(x["peak_mb"] for x in samples[label])
        print(f"| {dtype} | {layout} | {med:.2f} ({min(steps):.2f}-{max(steps):.2f}) | {base / med:.2f}x | "
              f"{peak:.0f} |")
    return samples


# ---------------------------------------------------------------------------
# --mode photos


class WaitTimed:
    """A data loader that adds up how long its consumer waited for each batch (``wait``, seconds)."""

    def __init__(self, loader):
        self.loader, self.wait = loader, 0.0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t
            yield batch


def photos_child(args):
    """``--epochs`` training epochs of ``--recipe fast`` on the photographs under ``--child-epochs`` (a folder
    holding DRIVE/), in this process, as train.py runs them on this CPU (its precision, width and memory
    format; the dataset's base size is the photographs' shorter side), with the geometry of ``--child-sampler``.
    Prints one JSON line: each epoch's seconds and how many of them its steps waited for data."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    import src
    from my_dataset import RepeatDataset, VesselDataset, dataset_files
    from train_utils.imaging import image_size
    from train_utils.precision import cpu_has_native_bf16
    from train_utils.settings import RECIPES, default_channels_last, fast_width
    from train_utils.train_and_eval import build_optimizer, create_lr_scheduler, train_one_epoch
    from train_utils.transforms import SegmentationPresetTrain

    torch.manual_seed(0)
    fast = RECIPES["fast"]
    bf16 = cpu_has_native_bf16()
    channels_last = default_channels_last("cpu", "bfloat16" if bf16 else None)
    samples = dataset_files("drive", args.child_epochs, "training")
    # The dataset's base size as train.py takes it for a dataset without one: the median shorter side.
    base = int(statistics.median(min(image_size(s.image)) for s in samples))
    train = VesselDataset(samples)
    train.transforms = SegmentationPresetTrain(base, fast["crop_size"], rotate=fast["rotate"],
                                               color_jitter=fast["color_jitter"],
                                               crop_first=args.child_sampler.startswith("crop-first"))
    dataset = RepeatDataset(train, fast["crops_per_image"])
    workers = 1 if args.child_sampler.endswith("+worker") else 0
    loader = WaitTimed(DataLoader(dataset, batch_size=fast["batch_size"], sampler=RandomSampler(dataset),
                                  num_workers=workers, persistent_workers=workers > 0,
                                  collate_fn=VesselDataset.collate_fn))
    model = src.build_model("unet", num_classes=2, base_c=fast_width(bf16))
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.parameters(), "adamw", fast["lr"], 0.9, fast["weight_decay"])
    lr_scheduler = create_lr_scheduler(optimizer, len(loader), args.epochs, schedule="cosine")
    step_model = torch.compile(model) if args.child_compile else model
    epochs = []
    for epoch in range(args.epochs):
        loader.wait, t = 0.0, time.perf_counter()
        loss, _ = train_one_epoch(step_model, optimizer, loader, torch.device("cpu"), epoch, 2, lr_scheduler,
                                  print_freq=10 ** 6, amp_dtype=torch.bfloat16 if bf16 else None,
                                  channels_last=channels_last)
        epochs.append({"epoch_s": time.perf_counter() - t, "data_s": loader.wait, "loss": loss})
    print(json.dumps({"epochs": epochs, "steps": len(loader), "base_size": base, "width": fast_width(bf16),
                      "dtype": "bfloat16" if bf16 else "float32",
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def train_py_env():
    """The environment train.py gives itself: this machine's default allocator preloaded."""
    from train_utils.allocator import choose
    name, lib = choose("auto")
    return clean_env(**({"LD_PRELOAD": lib} if lib else {})), name


def run_photos(args):
    """The fast recipe's steady training epoch and its data share on synthetic photographs of each size, for
    each geometry sampler, fresh processes interleaved; ratios against the first sampler."""
    from train_utils.synthetic import write_synthetic_drive

    env, allocator = train_py_env()
    print(f"allocator {allocator}; {args.images} training images x 4 crops of 256 per epoch; epochs 2..{args.epochs} "
          "timed (the first warms up)", flush=True)
    samples = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.photo_sizes:
            h, w = (int(v) for v in size.lower().split("x"))
            root = write_synthetic_drive(os.path.join(tmp, size), num_train=args.images, num_test=0, height=h,
                                         width=w, seed=0)
            for r in range(args.rounds):
                for sampler in (args.samplers if r % 2 == 0 else args.samplers[::-1]):
                    argv = [sys.executable, os.path.abspath(__file__), "--child", "--child-epochs", root,
                            "--child-sampler", sampler, "--epochs", str(args.epochs)]
                    _, _, out = run_measured(argv, env)
                    sample = json.loads(out.strip().splitlines()[-1])
                    samples.setdefault(size, {}).setdefault(sampler, []).append(sample)
                    steady = sample["epochs"][1:]
                    print(f"round {r + 1} {size} {sampler}: epochs {[round(e['epoch_s'], 2) for e in steady]} s, "
                          f"waited for data {[round(e['data_s'], 2) for e in steady]} s", flush=True)
    first = samples[args.photo_sizes[0]][args.samplers[0]][0]
    print(f"\n{first['dtype']}, width {first['width']}, {first['steps']} steps of 4 crops per epoch")
    print(f"| photographs | geometry | epoch (s), median (range) | waited for data (s / epoch) | data share | "
          f"speed-up vs {args.samplers[0]} | peak RSS (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size in args.photo_sizes:
        def epochs(sampler):
            return [e for x in samples[size][sampler] for e in x["epochs"][1:]]
        base = statistics.median(e["epoch_s"] for e in epochs(args.samplers[0]))
        for sampler in args.samplers:
            times = [e["epoch_s"] for e in epochs(sampler)]
            data = statistics.median(e["data_s"] for e in epochs(sampler))
            med = statistics.median(times)
            peak = statistics.median(x["peak_mb"] for x in samples[size][sampler])
            print(f"| {size.replace('x', ' x ')} | {sampler} | {med:.2f} ({min(times):.2f}-{max(times):.2f}) | "
                  f"{data:.2f} | {100 * data / med:.1f}% | {base / med:.2f}x | {peak:.0f} |")
    return samples


# ---------------------------------------------------------------------------
# --mode compile


def compile_configs(bf16_hardware):
    """(label, step_child flags) of each recipe's training step on this CPU: the tutorial's, and the fast recipe's
    at the precision and width train.py gives it here."""
    from train_utils.settings import fast_width
    configs = [("tutorial: float32, width 32, 4 crops of 480, SGD",
                ["-b", "4", "--crop-size", "480", "--base-c", "32", "--opt", "sgd"])]
    if bf16_hardware:
        configs.append((f"fast: bfloat16, width {fast_width(True)}, channels_last, 4 crops of 256, AdamW",
                        ["-b", "4", "--crop-size", "256", "--base-c", str(fast_width(True)), "--opt", "adamw",
                         "--child-dtype", "bfloat16", "--child-channels-last"]))
    else:
        configs.append((f"fast: float32, width {fast_width(False)}, 4 crops of 256, AdamW",
                        ["-b", "4", "--crop-size", "256", "--base-c", str(fast_width(False)), "--opt", "adamw"]))
    return configs


def run_compile(args):
    """Each recipe's training step eager and under torch.compile (inductor), fresh processes interleaved, from
    the same initial weights and batch: steady step time, the first step's extra time (compilation), the steps
    it takes to pay for itself, and the largest difference between the two runs' losses."""
    from train_utils.precision import cpu_has_native_bf16

    env, allocator = train_py_env()
    bf16 = cpu_has_native_bf16()
    print(f"allocator {allocator}; bfloat16 hardware: {'yes' if bf16 else 'no'}; {args.steps} timed steps after "
          "the first", flush=True)
    runs = []
    with tempfile.TemporaryDirectory() as cache:
        # Inductor caches what it compiled; an empty cache per process times the compilation a first run pays.
        for i, (label, flags) in enumerate(compile_configs(bf16)):
            argv = [sys.executable, os.path.abspath(__file__), "--child", "--steps", str(args.steps), *flags]
            fresh = dict(env, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, str(i)))
            runs += [(f"{label}, eager", argv, env), (f"{label}, compiled", argv + ["--child-compile"], fresh)]
        samples = run_step_children(runs, args.rounds)
    print("\n| step | eager s / step | compiled s / step | speed-up | compilation (s) | pays off after (steps) | "
          "first loss, relative difference | largest over the steps |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, _ in compile_configs(bf16):
        eager, comp = samples[f"{label}, eager"], samples[f"{label}, compiled"]
        e = statistics.median(x["step_s"] for x in eager)
        c = statistics.median(x["step_s"] for x in comp)
        extra = statistics.median(x["first_s"] for x in comp) - statistics.median(x["first_s"] for x in eager)
        pays = f"{extra / (e - c):.0f}" if c < e else "never"
        diffs = [[abs(a - b) / abs(a) for a, b in zip(x["losses"], y["losses"])] for x, y in zip(eager, comp)]
        print(f"| {label} | {e:.3f} | {c:.3f} | {e / c:.2f}x | {extra:.0f} | {pays} | "
              f"{max(d[0] for d in diffs):.1e} | {max(max(d) for d in diffs):.1e} |")
    return samples


# ---------------------------------------------------------------------------
# --mode predict


def write_photographs(folder, count, height, width):
    from PIL import Image
    from train_utils.synthetic import synthetic_fundus
    os.makedirs(folder)
    for k in range(count):
        image, _, _ = synthetic_fundus(height, width, seed=k)
        Image.fromarray(image).save(os.path.join(folder, f"photo{k:03d}.jpg"), quality=95)


def run_predicts(args):
    """Photographs per minute of each --predicts run on each --photo-sizes folder, interleaved over rounds."""
    weights = os.path.join(ROOT, "weights", "unet_vessels.pth")
    samples = []
    with tempfile.TemporaryDirectory() as tmp:
        baseline = os.path.join(tmp, "baseline")
        if "baseline" in args.predicts:
            r = subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", baseline, args.baseline],
                               capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"error: cannot check out --baseline {args.baseline}: {r.stderr.strip()}")
        try:
            runs = {"baseline": [sys.executable, os.path.join(baseline, "predict.py")],
                    "new": [sys.executable, os.path.join(ROOT, "predict.py")],
                    "new-workers1": [sys.executable, os.path.join(ROOT, "predict.py"), "--workers", "1"],
                    "new-measure": [sys.executable, os.path.join(ROOT, "predict.py"), "--measure"],
                    "new-amp": [sys.executable, os.path.join(ROOT, "predict.py"), "--amp"],
                    # two processes of one thread each (torchrun's default OMP_NUM_THREADS) sharing the folder
                    "new-2proc": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                  os.path.join(ROOT, "predict.py")]}
            for size in args.photo_sizes:
                h, w = (int(v) for v in size.split("x"))
                folder = os.path.join(tmp, f"photos{size}")
                write_photographs(folder, args.images, h, w)
                for rnd in range(args.rounds):
                    order = args.predicts if rnd % 2 == 0 else args.predicts[::-1]
                    for name in order:
                        out = os.path.join(tmp, f"out-{name}-{size}-{rnd}")
                        wall, peak, text = run_measured(runs[name] + ["--weights", weights, "--img", folder,
                                                                      "--output-dir", out, "--device", args.device],
                                                        clean_env())
                        seconds = float(re.search(r"predicted \d+ images? in ([\d.]+) s", text).group(1))
                        samples.append({"size": size, "run": name, "round": rnd, "seconds": seconds, "wall": wall,
                                        "per_minute": args.images / seconds * 60, "peak_mb": peak})
                        print(f"  {size} {name} round {rnd}: {args.images / seconds * 60:.1f} photographs/min, "
                              f"peak {peak:.0f} MB", flush=True)
        finally:
            if "baseline" in args.predicts:
                subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", baseline], capture_output=True)
    return samples


def print_predict_table(samples, args):
    print(f"\n| photographs | run | photographs/min, median (range) | against {args.predicts[0]} | peak RSS (MB) |")
    print("| --- | --- | --- | --- | --- |")
    for size in args.photo_sizes:
        first = None
        for name in args.predicts:
            rates = [s["per_minute"] for s in samples if s["size"] == size and s["run"] == name]
            peaks = [s["peak_mb"] for s in samples if s["size"] == size and s["run"] == name]
            med = statistics.median(rates)
            first = first or med
            print(f"| {args.images} of {size} | {name} | {med:.1f} ({min(rates):.1f}-{max(rates):.1f}) | "
                  f"{med / first:.2f}x | {max(peaks):.0f} |")


# ---------------------------------------------------------------------------
# --mode recipes


def recipe_command(recipe, args, root, out_dir):
    argv = [sys.executable, os.path.join(ROOT, "train.py"), "--data-path", root, "--recipe", recipe,
            "--device", args.device, "--output-dir", out_dir, "--seed", "0", "--no-plots", "--print-freq", "1000"]
    if recipe == "tutorial":
        argv += ["--epochs", str(args.tutorial_epochs)]
    argv += args.train_args.split()
    if recipe == "fast":
        argv += args.fast_args.split()
    return argv


def read_curve(log_path):
    """(validated epoch, cumulative seconds, dice, auc) per line of a ``log.jsonl``. Cumulative time is the
    log's ``elapsed`` (every epoch's training, validation and checkpoints, also epochs not validated)."""
    points, total = [], 0.0
    with open(log_path) as f:
        for line in f:
            rec = json.loads(line)
            total += rec["epoch_time"]
            points.append({"epoch": rec["epoch"], "seconds": rec.get("elapsed", total), "dice": rec["dice"],
                           "auc": rec.get("auc")})
    return points


def run_recipes(args, root):
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in ("tutorial", "fast"):
            out_dir = os.path.join(tmp, recipe)
            argv = recipe_command(recipe, args, root, out_dir)
            print("$ " + " ".join(argv[1:]), flush=True)
            wall, peak, _ = run_measured(argv, clean_env())
            points = read_curve(os.path.join(out_dir, "log.jsonl"))
            runs[recipe] = {"argv": argv[1:], "process_s": wall, "peak_mb": peak, "points": points}
            last = points[-1]
            print(f"{recipe}: {last['epoch'] + 1} epochs, final dice {last['dice']:.4f} in {last['seconds']:.1f} s "
                  f"(process {wall:.1f} s)", flush=True)
    return runs


def recipes_table(runs, target):
    budget = runs["tutorial"]["points"][-1]["seconds"]
    rows = []
    for recipe, run in runs.items():
        pts = run["points"]
        last = pts[-1]
        reached = next((p for p in pts if p["dice"] >= target), None)
        rows.append({"recipe": recipe, "epochs": last["epoch"] + 1, "validations": len(pts),
                     "final_dice": last["dice"], "final_auc": last["auc"], "best_dice": max(p["dice"] for p in pts),
                     "seconds": last["seconds"], "s_per_epoch": last["seconds"] / (last["epoch"] + 1),
                     "share_of_tutorial_time": last["seconds"] / budget,
                     "seconds_to_target": reached["seconds"] if reached else None,
                     "process_s": run["process_s"], "peak_mb": run["peak_mb"]})
    return rows


def print_recipes_table(rows, target):
    print(f"\n| recipe | epochs | final dice | final AUC | best dice (validations) | wall s (train + val) | s / epoch "
          f"| time vs tutorial | s to dice {target:.2f} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        auc = "-" if r["final_auc"] is None else f"{r['final_auc']:.4f}"
        to_target = "not reached" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.0f}"
        print(f"| {r['recipe']} | {r['epochs']} | {r['final_dice']:.4f} | {auc} | {r['best_dice']:.4f} "
              f"({r['validations']}) | {r['seconds']:.0f} | {r['s_per_epoch']:.1f} | "
              f"{r['share_of_tutorial_time']:.2f}x | {to_target} |")


def plot_recipes(runs, target, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for recipe, style in (("tutorial", "o-"), ("fast", "s-")):
        pts = runs[recipe]["points"]
        ax.plot([p["seconds"] for p in pts], [p["dice"] for p in pts], style, ms=3,
                label=f"--recipe {recipe} ({pts[-1]['epoch'] + 1} epochs)")
    budget = runs["tutorial"]["points"][-1]["seconds"]
    ax.axhline(target, color="grey", ls="--", lw=1)
    ax.text(0, target + 0.005, f"dice {target:.2f}", color="grey", fontsize=8)
    ax.axvline(budget, color="grey", ls=":", lw=1)
    ax.text(budget, 0.98, f"{runs['tutorial']['points'][-1]['epoch'] + 1} tutorial epochs ", color="grey",
            fontsize=8, rotation=90, va="top", ha="right")
    ax.set_xlabel("wall time (s): training + validation")
    ax.set_ylabel("validation dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------


def main():
    args = get_args_parser().parse_args()
    if args.child:
        return photos_child(args) if args.child_epochs else step_child(args)
    if args.epochs is None:
        args.epochs = 3 if args.device == "cpu" else 12
    if args.photo_sizes is None:
        args.photo_sizes = ["584x565", "960x999"] if args.mode == "predict" else ["960x999", "2336x3504"]
    if args.rounds < 1 or args.epochs < 2 or args.steps < 1 or args.tutorial_epochs < 1:
        sys.exit("error: --rounds, --steps and --tutorial-epochs must be at least 1, --epochs at least 2")
    if args.mode == "precision" and args.device != "cpu":
        sys.exit("error: --mode precision times CPU steps (bfloat16 autocast on the CPU); leave out --device")
    unknown = set(args.configs) - {"a", "b", "b-device", "b-glibc", "b-mimalloc", "b-tcmalloc"}
    if unknown:
        sys.exit(f"error: unknown --configs {sorted(unknown)}")
    sizes = ("" if args.mode in ("recipes", "photos", "compile", "predict")
             else f", batch {args.batch_size}, crop {args.crop_size}, base_c {args.base_c}")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}, "
          f"mode {args.mode}, device {args.device}{sizes}", flush=True)
    if args.mode == "allocators":
        samples = run_allocators(args)
    elif args.mode == "photos":
        samples = run_photos(args)
    elif args.mode == "predict":
        samples = run_predicts(args)
        print_predict_table(samples, args)
    elif args.mode == "compile":
        samples = run_compile(args)
    elif args.mode == "precision":
        samples = run_precisions(args)
    elif args.mode == "recipes":
        with tempfile.TemporaryDirectory() as tmp:
            root = args.data_path
            if root is None:
                from train_utils.synthetic import write_synthetic_drive
                h, w = args.image_size
                root = write_synthetic_drive(tmp, num_train=args.images, num_test=args.val_images, height=h,
                                             width=w, seed=0)
            runs = run_recipes(args, root)
        rows = recipes_table(runs, args.target)
        print_recipes_table(rows, args.target)
        plot_recipes(runs, args.target, args.plot)
        samples = {"table": rows, "runs": runs}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            root = args.data_path
            if root is None:
                from train_utils.synthetic import write_synthetic_drive
                root = write_synthetic_drive(tmp, num_train=args.images, num_test=args.val_images, seed=0)
            train_dir = os.path.join(root, "DRIVE", "training", "images")
            train_images = len([n for n in os.listdir(train_dir) if n.endswith(".tif")]) if os.path.isdir(
                train_dir) else args.images
            print(f"data: {root if args.data_path else 'synthetic 584x565'}, {train_images} training images; "
                  f"epoch = (T{args.epochs} - T1) / {args.epochs - 1}", flush=True)
            samples = run_epochs(args, root)
            print_epoch_table(samples, args, train_images)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "samples": samples}, f, indent=1)


if __name__ == "__main__":
    main()
