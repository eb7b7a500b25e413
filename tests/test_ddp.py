"""DDP on the CPU (gloo) with torchrun: exact distributed validation, and two nodes over 127.0.0.1."""
import json
import os
import re
import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY_TRAIN, run_script

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics_of(stdout):
    """The last validation block's numbers as printed."""
    dice = re.findall(r"^dice coefficient: ([\d.]+)", stdout, re.M)[-1]
    block = stdout[stdout.rindex("global correct"):]
    lines = block.splitlines()[:4]
    return dice, lines


def test_torchrun_two_processes_matches_single_process_eval(drive_root, tmp_path):
    """3 validation images on 2 ranks: each image counted once, so the metrics equal a 1-process --test-only."""
    out = tmp_path / "ddp"
    r = run_script(TORCHRUN + ["--standalone", "--nproc_per_node=2", os.path.join(ROOT, "train_multi_GPU.py")],
                   "--data-path", drive_root, "--output-dir", out, "--epochs", 2, *TINY_TRAIN, "--sync-bn")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "backend gloo" in r.stdout and "2 processes (gloo)" in r.stdout
    assert "--sync-bn is ignored on the CPU" in r.stdout
    assert r.stdout.count("\ndice coefficient:") == 2  # only rank 0 prints the summaries, once per epoch
    with open(out / "log.jsonl") as f:
        log = [json.loads(line) for line in f]
    assert [rec["epoch"] for rec in log] == [0, 1]
    ddp_dice, ddp_block = metrics_of(r.stdout)

    single = run_script("train.py", "--data-path", drive_root, "--test-only", "--resume", out / "checkpoint.pth",
                        "--output-dir", tmp_path / "single", *TINY_TRAIN)
    assert single.returncode == 0, single.stderr
    one_dice, one_block = metrics_of(single.stdout)
    assert ddp_dice == one_dice and ddp_block == one_block
    assert abs(log[-1]["dice"] - float(one_dice)) < 1e-3
    # Vessel metrics agree as well.
    for key in ("sensitivity", "specificity", "auc"):
        assert re.findall(rf"{key}: ([\d.na]+)", r.stdout)[-1] == re.findall(rf"{key}: ([\d.na]+)", single.stdout)[-1]
    # A distributed --test-only gathers every rank's per-image rows into the same test_metrics.csv.
    r = run_script(TORCHRUN + ["--standalone", "--nproc_per_node=2", os.path.join(ROOT, "train_multi_GPU.py")],
                   "--data-path", drive_root, "--test-only", "--resume", out / "checkpoint.pth",
                   "--output-dir", tmp_path / "ddp_eval", *TINY_TRAIN)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    csv_text = (tmp_path / "single" / "test_metrics.csv").read_text()
    assert csv_text.count("\n") == 5  # header, 3 images, pooled
    assert (tmp_path / "ddp_eval" / "test_metrics.csv").read_text() == csv_text


def test_two_nodes_over_loopback(drive_root, tmp_path):
    """Two torchrun 'nodes' of one process each rendezvous on 127.0.0.1 and finish an epoch."""
    port = free_port()
    procs = []
    for node_rank in (0, 1):
        cmd = TORCHRUN + ["--nnodes=2", f"--node_rank={node_rank}", "--nproc_per_node=1",
                          "--master_addr=127.0.0.1", f"--master_port={port}",
                          os.path.join(ROOT, "train_multi_GPU.py"), "--data-path", drive_root,
                          "--output-dir", str(tmp_path / f"node{node_rank}"), "--epochs", "1", *TINY_TRAIN]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=180))
    finally:
        for p in procs:
            p.kill()
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stdout[-1500:] + stderr[-1500:]
    assert "dice coefficient:" in outs[0][0]
    # Only global rank 0 (node 0) writes checkpoints.
    assert (tmp_path / "node0" / "checkpoint.pth").exists()
    assert not (tmp_path / "node1" / "checkpoint.pth").exists()


def test_train_multi_gpu_without_torchrun_runs_as_one_process(drive_root, tmp_path):
    r = run_script("train_multi_GPU.py", "--data-path", drive_root, "--output-dir", tmp_path, "--epochs", 1,
                   *TINY_TRAIN, "--sync_bn", "--start_epoch", 0)
    assert r.returncode == 0, r.stderr
    assert "dice coefficient:" in r.stdout and (tmp_path / "checkpoint.pth").exists()


@pytest.mark.parametrize("flag", ["--dist-url", "--world-size"])
def test_distributed_flags_exist(flag):
    r = run_script("train_multi_GPU.py", "--help")
    assert r.returncode == 0 and flag in r.stdout and "--sync-bn" in r.stdout
