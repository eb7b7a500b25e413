"""The tutorial's recipe and predict.py on a GPU, each new path beside the tutorial's default one:

    200 epochs: S s, dice D  (path)
    GPU busy: B%  (path)
    predict: R photographs/s  (path)

    python benchmarks/gpu_speed.py --data-path ROOT          # ROOT holds DRIVE/ (about 6 minutes on an H100)
    python benchmarks/gpu_speed.py --paths tutorial device   # only these training paths
    python benchmarks/gpu_speed.py --device cpu --epochs 2 --photos 8 --train-args="--base-c 8 --crop-size 64"

Each training path is train.py with the tutorial's recipe (its defaults: 200 epochs, batches of 4 crops of
480, SGD, validation of every test image after every epoch), seed 0, without the pictures (``--no-plots``:
the tutorial draws none), plus the path's flags (``PATHS``).
The seconds are train.py's own: ``elapsed`` of the last record of its log.jsonl, the training and
validation since the first epoch began (start-up not counted); the dice is that last epoch's. GPU busy is
nvidia-smi's ``utilization.gpu`` sampled every 0.5 s from the end of the first training step to train.py's
last line. Each run's ``profile`` line splits its steady epoch (the median over epochs after the first) as
train.py's own lines report it: the training steps, the part of them spent waiting for the next batch,
validation's forward passes, the rest of the epoch (the scores' reduction, the logs), and what runs between
epochs (the checkpoints' copy, the pictures).

predict.py runs on ``--photos`` DRIVE-sized photographs (the test images of ``--data-path`` repeated, with
their FOV masks; synthetic ones without it) with the tutorial path's ``best_model.pth``: its defaults
against each ``PREDICTS`` entry. Photographs a second are from its own "predicted N images in T s" (the
model's loading not counted).

Without ``--data-path`` the images are synthetic (20 training and 20 test images of 584 x 565): the times
hold, the dice is not DRIVE's.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# train.py flags of each path, on top of the tutorial's recipe (train.py's defaults)
PATHS = {
    "tutorial": [],
    "data-on-device": ["--data-on-device"],  # not run by default: the batches alone, validation as the tutorial's
    "device": ["--data-on-device", "--val-batch-size", "20"],
    "device-bf16": ["--data-on-device", "--val-batch-size", "20", "--amp", "--amp-dtype", "bfloat16"],
}
# predict.py flags of each prediction run
PREDICTS = {
    "tutorial": [],
    "batched": ["--batch-size", "8", "--workers", "4"],
}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", default=None, help="folder that holds DRIVE/ (default: synthetic images)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--epochs", default=200, type=int, help="the tutorial's 200")
    parser.add_argument("--paths", nargs="+", default=["tutorial", "device", "device-bf16"], choices=list(PATHS),
                        help="training paths, the first the baseline")
    parser.add_argument("--predicts", nargs="+", default=list(PREDICTS), choices=list(PREDICTS),
                        help="prediction runs, the first the baseline (none: --photos 0)")
    parser.add_argument("--photos", default=200, type=int, help="DRIVE-sized photographs for predict.py (0: none)")
    parser.add_argument("--train-args", default="", help="extra train.py flags for every path")
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="write every number here")
    return parser


class BusySampler:
    """nvidia-smi's GPU utilisation every 0.5 s, in a thread; ``mean(start, end)`` over that window of
    ``time.time()``. Without nvidia-smi (or on the CPU) it samples nothing."""

    def __init__(self, device):
        self.samples = []
        self.proc = None
        if not device.startswith("cuda") or shutil.which("nvidia-smi") is None:
            return
        index = device.split(":")[1] if ":" in device else "0"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            index = visible.split(",")[int(index)]
        self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", index, "-lms", "500"], stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append((time.time(), int(line)))

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    def mean(self, start, end):
        inside = [u for t, u in self.samples if start <= t <= end]
        return statistics.mean(inside) if inside else None


def run_train(name, flags, args, data_root, out_dir):
    """One training path: its numbers (seconds, dice, GPU busy, the profile of its epochs)."""
    argv = [sys.executable, os.path.join(ROOT, "train.py"), "--data-path", data_root, "--device", args.device,
            "--epochs", str(args.epochs), "--output-dir", out_dir, "--seed", "0", "--no-plots",
            "--print-freq", "1000", *args.train_args.split(), *flags]
    print(f"--- {name}: {' '.join(argv[1:])}", flush=True)
    sampler = BusySampler(args.device)
    first_step = end = None
    epochs = []  # per epoch: [training s, waiting s, validation s]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    log, steps, batches = [], 0, 0
    for line in proc.stdout:
        log.append(line)
        step = re.match(r"Epoch: \[(\d+)\]\s+\[\s*(\d+)/(\d+)\].*data: ([0-9.]+)", line)
        if step and first_step is None:
            first_step = time.time()
        if step and int(step.group(2)) == int(step.group(3)) - 1:  # the epoch's last step: the mean wait over it
            steps = int(step.group(3))
            epochs.append([0.0, float(step.group(4)) * steps, 0.0])
        batch = re.match(r"Test:\s+\[\s*\d+/(\d+)\]", line)
        if batch:
            batches = int(batch.group(1))
        total = re.match(r"(Epoch: \[\d+\]|Test:) Total time: \S+ \(([0-9.]+) s / it\)", line)
        if total and epochs:
            training = total.group(1) != "Test:"
            epochs[-1][0 if training else 2] = float(total.group(2)) * (steps if training else batches)
        if line.startswith("training time"):
            end = time.time()
    proc.wait()
    sampler.stop()
    if proc.returncode != 0:
        sys.exit(f"error: {name}: train.py failed ({proc.returncode}):\n{''.join(log[-30:])}")
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    between = [b["elapsed"] - a["elapsed"] - b["epoch_time"] for a, b in zip(records, records[1:])]
    steady = epochs[1:] or epochs
    return {"path": name, "flags": flags, "seconds": records[-1]["elapsed"], "dice": records[-1]["dice"],
            "best_dice": max(r["dice"] for r in records), "epochs": len(records),
            "gpu_busy": sampler.mean(first_step or 0, end or time.time()),
            "first_epoch": records[0]["epoch_time"],
            "epoch": statistics.median(r["epoch_time"] for r in (records[1:] or records)),
            "training": statistics.median(e[0] for e in steady),
            "data_wait": statistics.median(e[1] for e in steady),
            "validation": statistics.median(e[2] for e in steady),
            "between_epochs": statistics.median(between) if between else 0.0}


def photo_folder(data_root, count, folder):
    """``count`` photographs in ``folder``/images, with their FOV masks in ``folder``/mask: the test images of
    ``data_root``'s DRIVE/test repeated under new names (links)."""
    test = os.path.join(data_root, "DRIVE", "test")
    names = sorted(n for n in os.listdir(os.path.join(test, "images")) if not n.startswith("."))
    for sub in ("images", "mask"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for k in range(count):
        name = names[k % len(names)]
        stem = os.path.splitext(name)[0]
        new = f"r{k // len(names):03d}_{stem}"
        os.symlink(os.path.abspath(os.path.join(test, "images", name)),
                   os.path.join(folder, "images", new + os.path.splitext(name)[1]))
        os.symlink(os.path.abspath(os.path.join(test, "mask", stem + "_mask.gif")),
                   os.path.join(folder, "mask", new + "_mask.gif"))
    return os.path.join(folder, "images"), os.path.join(folder, "mask")


def run_predict(name, flags, args, weights, images, masks, out_dir):
    argv = [sys.executable, os.path.join(ROOT, "predict.py"), "--weights", weights, "--img", images,
            "--roi-mask", masks, "--output-dir", out_dir, "--device", args.device, *flags]
    print(f"--- predict {name}: {' '.join(argv[1:])}", flush=True)
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    done = re.search(r"predicted (\d+) images? in ([0-9.]+) s", r.stdout)
    if r.returncode != 0 or not done:
        sys.exit(f"error: predict {name} failed ({r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    count, seconds = int(done.group(1)), float(done.group(2))
    return {"predict": name, "flags": flags, "photographs": count, "seconds": seconds,
            "per_second": count / max(seconds, 0.01)}  # printed to the hundredth


def describe(flags, baseline):
    return " ".join(flags) if flags else baseline


def main(args):
    out = args.out or tempfile.mkdtemp(prefix="gpu_speed_")
    os.makedirs(out, exist_ok=True)
    data_root = args.data_path
    if data_root is None:
        sys.path.insert(0, ROOT)
        from train_utils.synthetic import write_synthetic_drive
        data_root = write_synthetic_drive(os.path.join(out, "synthetic"), num_train=20, num_test=20)
        print("no --data-path: synthetic images (the times hold; the dice is not DRIVE's)")
    trains = [run_train(name, PATHS[name], args, data_root, os.path.join(out, f"train-{name}"))
              for name in args.paths]
    predicts = []
    if args.photos:
        images, masks = photo_folder(data_root, args.photos, os.path.join(out, "photos"))
        weights = os.path.join(out, f"train-{args.paths[0]}", "best_model.pth")
        predicts = [run_predict(name, PREDICTS[name], args, weights, images, masks,
                                os.path.join(out, f"predict-{name}")) for name in args.predicts]
    print()
    for t in trains:
        print(f"{args.epochs} epochs: {t['seconds']:.1f} s, dice {t['dice']:.4f}  "
              f"({t['path']}: {describe(t['flags'], 'train.py defaults')})")
    for t in trains:
        busy = "n/a (no nvidia-smi)" if t["gpu_busy"] is None else f"{t['gpu_busy']:.0f}%"
        print(f"GPU busy: {busy}  ({t['path']})")
    for p in predicts:
        print(f"predict: {p['per_second']:.1f} photographs/s  ({p['predict']}: "
              f"{describe(p['flags'], 'predict.py defaults')})")
    for t in trains:
        rest = t["epoch"] - t["training"] - t["validation"]
        print(f"profile ({t['path']}): steady epoch {t['epoch']:.3f} s = training {t['training']:.3f} s "
              f"(waiting for batches {t['data_wait']:.3f} s) + validation {t['validation']:.3f} s + scores and "
              f"logs {rest:.3f} s; between epochs {t['between_epochs']:.3f} s; first epoch {t['first_epoch']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"train": trains, "predict": predicts, "data": args.data_path or "synthetic"}, f, indent=1)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
