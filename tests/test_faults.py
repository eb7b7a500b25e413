"""Faults: a kill at any moment, a failed save, a full disk, a lost DDP process, a collective that never completes."""
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

import train
import train_utils.checkpoint as checkpoint
from tests.conftest import ROOT, TINY_TRAIN, run_script
from train_utils.errors import UserError
from train_utils.files import atomic_write

DISK_FULL = r"cannot write '.*': the disk is full \(errno ENOSPC\)"


def parse(*argv):
    return train.parse_args(train.get_args_parser(), [str(a) for a in argv])


def temporary_files(folder):
    return [n for n in os.listdir(folder) if ".tmp" in n]


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
    with pytest.raises(UserError, match=DISK_FULL):
        checkpoint.save_checkpoint({"model": {"w": torch.zeros(3)}, "epoch": 2}, path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def test_checkpoints_written_behind_training_hold_the_state_of_their_epoch(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 4, "rng": [(1, (2, 3))]}
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = optimizer.state_dict()["state"][0]["momentum_buffer"].clone()
    paths = [tmp_path / "best_model.pth", tmp_path / "checkpoint.pth"]
    with checkpoint.CheckpointWriter() as writer:
        writer.write(state, paths)
        with torch.no_grad():  # the next epoch changes the weights and the momentum in place at once
            for p in model.parameters():
                p.add_(1.0)
            optimizer.state[model.weight]["momentum_buffer"].mul_(0)
    for path in paths:  # both whole when the block is left, with the weights of the moment write was called
        saved = torch.load(path, weights_only=True)
        assert saved["epoch"] == 4 and saved["rng"] == [(1, (2, 3))]
        assert all(torch.equal(saved["model"][k], v) for k, v in expected.items())
        assert torch.equal(saved["optimizer"]["state"][0]["momentum_buffer"], momentum)
    assert sorted(os.listdir(tmp_path)) == ["best_model.pth", "checkpoint.pth"]


def test_a_failed_write_behind_training_stops_the_run_at_the_next_save(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.torch, "save", full_disk(None))
    writer = checkpoint.CheckpointWriter()
    writer.write({"epoch": 0}, [tmp_path / "checkpoint.pth"])
    with pytest.raises(UserError, match=DISK_FULL):
        writer.write({"epoch": 1}, [tmp_path / "checkpoint.pth"])  # the error of epoch 0's write
    with pytest.raises(UserError, match=DISK_FULL):
        with writer:  # and leaving the block raises the last write's
            writer.write({"epoch": 2}, [tmp_path / "checkpoint.pth"])
    assert not os.listdir(tmp_path)


def full_disk(write):
    """``write`` failing as on a full disk: half a file, then the error of the ENOSPC (``torch.save`` raises a
    RuntimeError while handling it)."""
    def broken(obj, f):
        f.write(b"PK\x03\x04 half a file")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    return broken


@pytest.mark.parametrize("error,message", [
    (OSError(errno.ENOSPC, "No space left on device"), r"the disk is full \(errno ENOSPC\)"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), r"the disk quota is used up \(errno EDQUOT\)"),
    ("torch", r"the disk is full \(errno ENOSPC\)"),
])
def test_a_full_disk_is_one_line_naming_the_file(tmp_path, error, message):
    path = tmp_path / "file.bin"
    path.write_bytes(b"earlier")

    def write(tmp):
        with open(tmp, "wb") as f:
            if error == "torch":
                full_disk(None)(None, f)
            f.write(b"half")
            raise error

    with pytest.raises(UserError, match=f"cannot write '{re.escape(str(path))}': {message}"):
        atomic_write(path, write)
    assert path.read_bytes() == b"earlier" and os.listdir(tmp_path) == ["file.bin"]


def test_other_write_failures_stay_what_they_are(tmp_path):
    def write(tmp):
        open(tmp, "w").close()
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        atomic_write(tmp_path / "file.bin", write)
    assert os.listdir(tmp_path) == []


def test_a_really_full_disk(small_disk):
    disk = small_disk(256 * 1024)
    path = disk / "checkpoint.pth"
    checkpoint.save_checkpoint({"w": torch.ones(10)}, path)
    with pytest.raises(UserError, match=DISK_FULL):
        checkpoint.save_checkpoint({"w": torch.zeros(200_000)}, path)  # 800 kB
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(10))
    with pytest.raises(UserError, match=DISK_FULL):
        atomic_write(disk / "big.bin", lambda tmp: open(tmp, "wb").write(b"x" * 400_000))
    assert sorted(os.listdir(disk)) == ["checkpoint.pth"]


def test_full_disk_during_training_keeps_a_resumable_checkpoint(drive_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    common = ["--data-path", drive_root, "--output-dir", out, "--epochs", 3, "--no-plots", *TINY_TRAIN]
    real_save, calls = checkpoint.torch.save, []

    def save(obj, f):  # epoch 0 writes best_model.pth and checkpoint.pth; then the disk is full
        calls.append(1)
        return real_save(obj, f) if len(calls) <= 2 else full_disk(None)(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    with pytest.raises(UserError, match=DISK_FULL.replace(".*", ".*(best_model|checkpoint)\\.pth")):
        train.main(parse(*common))
    monkeypatch.undo()
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 0 and not temporary_files(out)
    train.main(parse(*common, "--resume", out / "checkpoint.pth", "--stop-epoch", 1))
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1


def test_training_onto_a_really_full_disk(drive_root, small_disk):
    """A model_N.pth per epoch fills 4 MiB within a few epochs of the tiny model (0.6 MB a checkpoint)."""
    out = small_disk(4 * 2 ** 20) / "run"
    r = run_script("train.py", "--data-path", drive_root, "--output-dir", out, "--epochs", 12, "--no-save-best",
                   "--no-plots", *TINY_TRAIN)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1 and re.match("error: " + DISK_FULL, lines[0]), r.stderr
    assert load_all_pth(out) and not temporary_files(out)  # every .pth on disk is whole
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] >= 1


def test_too_little_space_for_a_checkpoint_stops_before_training(drive_root, tmp_path, small_disk, monkeypatch):
    common = ["--epochs", 1, "--data-path", drive_root, *TINY_TRAIN]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10 ** 9, free=10 ** 5))
    with pytest.raises(UserError, match=r"not enough free space in '.*' for 2 checkpoints of this model \(about "):
        train.main(parse("--output-dir", tmp_path / "a", *common))
    assert os.listdir(tmp_path / "a") == []
    monkeypatch.undo()
    out = small_disk(2 ** 20) / "run"  # the tiny model's checkpoints need 2 x 1.6 MiB with the margin
    with pytest.raises(UserError, match=r"MiB needed, .* MiB free; free some space"):
        train.main(parse("--output-dir", out, *common))
    assert os.listdir(out) == []


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
