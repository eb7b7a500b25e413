"""Faults: a kill at any moment, a failed save, a lost DDP process, a collective that never completes."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import train_utils.checkpoint as checkpoint
from tests.conftest import ROOT, TINY_TRAIN, run_script


def load_all_pth(folder):
    names = sorted(n for n in os.listdir(folder) if n.endswith(".pth"))
    for n in names:
        torch.load(os.path.join(folder, n), weights_only=True)
    return names


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("delay", [0.0, 0.15])
def test_kill_during_training_then_resume_finishes(drive_root, tmp_path, delay):
    out = tmp_path / "run"
    args = [sys.executable, os.path.join(ROOT, "train.py"), "--data-path", drive_root, "--output-dir", str(out),
            "--epochs", "6", *TINY_TRAIN]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Kill while it is writing: right after the first checkpoint appears, plus a delay.
        assert wait_for(lambda: (out / "checkpoint.pth").exists(), proc), "training ended before a checkpoint"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    names = load_all_pth(out)  # every .pth on disk loads
    assert "checkpoint.pth" in names
    r = run_script("train.py", "--data-path", drive_root, "--output-dir", out, "--epochs", 6,
                   "--resume", out / "checkpoint.pth", *TINY_TRAIN)
    assert r.returncode == 0, r.stderr
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 5
    assert not [n for n in os.listdir(out) if ".tmp" in n]  # leftovers of the killed write are cleaned


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    checkpoint.save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 1}, path)

    def broken_save(obj, f):
        f.write(b"PK\x03\x04 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint({"model": {"w": torch.zeros(3)}, "epoch": 2}, path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def test_lost_ddp_process_ends_the_whole_run(drive_root, tmp_path):
    """Kill one rank mid-training: the survivors must not wait forever; the job exits non-zero."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train_multi_GPU.py"), "--data-path", drive_root, "--output-dir", str(tmp_path),
           "--epochs", "500", "--dist-timeout", "0.5", *TINY_TRAIN]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    start = time.time()
    try:
        pid = None
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"distributed init \(rank 1/2.*pid (\d+)\)", line)
            if m:
                pid = int(m.group(1))
            if pid and "Epoch: [1]" in line:
                os.kill(pid, signal.SIGKILL)
                break
        assert pid, "".join(lines)[-2000:]
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert time.time() - start < 120


def _timeout_worker(rank, init_file, result_file):
    import datetime

    import torch.distributed as dist
    # A generous timeout to meet (a loaded machine may start the processes seconds apart),
    # then a group with a short one for the collective that is left waiting.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=2))
    if rank == 1:
        time.sleep(60)  # never joins the all-reduce
        return
    try:
        dist.all_reduce(torch.ones(1), group=group)
        outcome = "completed"
    except Exception as e:  # noqa: BLE001 - the kind of error is the point
        outcome = type(e).__name__
    with open(result_file, "w") as f:
        f.write(outcome)


def test_collective_times_out_instead_of_hanging(tmp_path):
    """Rank 0 waits on a peer that never comes: it must fail (raise or abort) within seconds, not hang."""
    ctx = mp.get_context("spawn")
    result = tmp_path / "result"
    procs = [ctx.Process(target=_timeout_worker, args=(r, str(tmp_path / "init"), str(result))) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        procs[0].join(timeout=45)  # 2 s timeout + start-up; the silent peer sleeps 60 s
        assert not procs[0].is_alive(), "rank 0 still waiting"
        # Gloo either raises (the error is reported) or aborts the process; it never completes.
        outcome = result.read_text() if result.exists() else f"exit code {procs[0].exitcode}"
        assert outcome != "completed"
        assert result.exists() or procs[0].exitcode != 0
    finally:
        for p in procs:
            p.kill()
            p.join()
