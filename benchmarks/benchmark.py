"""Side-by-side speed and memory of the tutorial's training run (a) and this project's train.py (b), as users run them;
and the dice against wall time of the two recipes (``--mode recipes``).

    python benchmarks/benchmark.py                             # epochs on synthetic DRIVE-sized data (~10 min, 2 cores)
    python benchmarks/benchmark.py --rounds 1 --images 4 --val-images 2       # a quicker look
    python benchmarks/benchmark.py --data-path ROOT            # real images (a folder holding DRIVE/)
    python benchmarks/benchmark.py --configs a b b-glibc       # also train.py with glibc's malloc
    python benchmarks/benchmark.py --device cuda --b-args="--amp"            # on a GPU, (b) with AMP
    python benchmarks/benchmark.py --mode allocators           # one training step under each memory allocator
    python benchmarks/benchmark.py --mode precision -b 4 --crop-size 256 --opt adamw   # float32 / bfloat16 step
    python benchmarks/benchmark.py --mode recipes --data-path ROOT --plot docs/recipes.png   # --recipe fast vs tutorial

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

This is a benchmark, not a test: it prints numbers and ratios.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from train_utils.allocator import find_mimalloc, find_tcmalloc  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="epoch", choices=["epoch", "allocators", "precision", "recipes"])
    parser.add_argument("--data-path", default=None,
                        help="folder that holds DRIVE/ (default: synthetic 584x565 images in a temp folder)")
    parser.add_argument("--configs", nargs="+", default=["a", "b"],
                        help="a (tutorial), b (train.py), b-glibc / b-mimalloc / b-tcmalloc (train.py with that "
                             "UNET_ALLOCATOR)")
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
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
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
    allocator = {"b": "auto", "b-glibc": "system", "b-mimalloc": "mimalloc", "b-tcmalloc": "tcmalloc"}[config]
    argv = [sys.executable, os.path.join(ROOT, "train.py"), *common, "--print-freq", "1000", *args.b_args.split()]
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

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(image)["out"]
            loss = criterion({"out": logits}, target, weight, num_classes=2, ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return logits

    logits = step()  # warm-up: the optimizer's buffers, the first touch of everything
    times = []
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"step_s": statistics.median(times), "sys_s": (r1.ru_stime - r0.ru_stime) / args.steps,
                      "faults": (r1.ru_minflt - r0.ru_minflt) / args.steps, "peak_mb": r1.ru_maxrss / 1024,
                      "logits": str(logits.dtype).replace("torch.", ""),
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
        return step_child(args)
    if args.epochs is None:
        args.epochs = 3 if args.device == "cpu" else 12
    if args.rounds < 1 or args.epochs < 2 or args.steps < 1 or args.tutorial_epochs < 1:
        sys.exit("error: --rounds, --steps and --tutorial-epochs must be at least 1, --epochs at least 2")
    if args.mode == "precision" and args.device != "cpu":
        sys.exit("error: --mode precision times CPU steps (bfloat16 autocast on the CPU); leave out --device")
    unknown = set(args.configs) - {"a", "b", "b-glibc", "b-mimalloc", "b-tcmalloc"}
    if unknown:
        sys.exit(f"error: unknown --configs {sorted(unknown)}")
    sizes = "" if args.mode == "recipes" else f", batch {args.batch_size}, crop {args.crop_size}, base_c {args.base_c}"
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}, "
          f"mode {args.mode}, device {args.device}{sizes}", flush=True)
    if args.mode == "allocators":
        samples = run_allocators(args)
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
