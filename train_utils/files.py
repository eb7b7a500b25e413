"""Writing files safely: a folder proven writable before long work, writes that never leave half a file, a
full disk reported as one line, and writing behind the work that makes the files (``Behind``)."""
import datetime
import errno
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

from .errors import UserError

# What a full disk (or a used-up quota) raises as, anywhere in a failed write's chain of exceptions.
DISK_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up"}
# Folders ensure_writable_folder created in this process, outermost first (remove_new_empty_folders).
_new_folders = []


class DiskFullError(UserError):
    """A write that found the disk full: nothing later can be written either, so a run stops on it."""


def temp_name(path, suffix=""):
    """The temporary name ``path`` is written under: hidden, in the same folder (so the rename is atomic)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp{os.getpid()}{suffix}")


def disk_full_errno(exc):
    """ENOSPC or EDQUOT when ``exc`` or an exception it arose from says the disk is full, else None.

    ``torch.save`` reports a full disk as ``RuntimeError: ... unexpected pos``
    raised while handling the ``OSError`` that has the errno.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    return None


def atomic_write(path, write, suffix="", durable=False):
    """Call ``write(tmp)`` for a temporary file beside ``path``, then rename it to ``path``.

    A crash, a full disk or a failing ``write`` at any moment leaves the
    previous ``path`` as it was, and the temporary file is removed; a full disk
    is a ``UserError`` naming ``path``. ``suffix`` keeps the extension writers
    that look at it need (``.png``); ``durable`` also flushes the file and the
    rename to the disk (checkpoints).
    """
    tmp = temp_name(path, suffix)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        code = disk_full_errno(e)
        if code is None:
            raise
        raise DiskFullError(f"cannot write '{path}': {DISK_FULL[code]} (errno {errno.errorcode[code]}); nothing of it "
                        "was written, and an earlier file of that name is unchanged") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if durable:
        try:  # make the rename itself durable
            fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass


def append_text(path, text):
    """Append ``text`` to the small text file ``path`` (a run's logs), by writing the whole file anew through
    ``atomic_write``: a full disk leaves the file as it was, never half a line."""
    old = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(old + text)

    atomic_write(path, write)


def nearest_existing(path):
    """``path`` or its nearest ancestor that exists."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def ensure_writable_folder(folder, what):
    """Create ``folder`` and prove a file can be written in it; a ``UserError`` naming ``what`` if not."""
    probe = os.path.join(folder, f".write-test-{os.getpid()}")
    first_new = None if os.path.exists(folder) else _first_missing(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        if first_new is not None:
            _new_folders.append((first_new, os.path.abspath(folder)))
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to {what}: {e.strerror or e}") from None


def _first_missing(folder):
    """The outermost folder of ``folder``'s path that does not exist yet."""
    folder = os.path.abspath(folder)
    while not os.path.exists(os.path.dirname(folder)):
        folder = os.path.dirname(folder)
    return folder


def remove_new_empty_folders():
    """Remove the folders ``ensure_writable_folder`` created, where nothing was written in them: a run that
    fails before its first file leaves no empty output folder behind. Anything holding a file stays."""
    while _new_folders:
        top, folder = _new_folders.pop()
        while True:
            try:
                os.rmdir(folder)  # only ever removes an empty folder
            except OSError:
                break
            if folder == top:
                break
            folder = os.path.dirname(folder)


def require_free_space(folder, needed, what):
    """A ``UserError`` when the disk of ``folder`` (or of its nearest existing ancestor) has fewer than
    ``needed`` bytes free; ``what`` says what they are for."""
    free = shutil.disk_usage(nearest_existing(folder)).free
    if free < needed:
        raise UserError(f"not enough free space in '{folder}' for {what}: about {_mb(needed)} needed, "
                        f"{_mb(free)} free; free some space or write elsewhere")


def _mb(n):
    return f"{n / 2 ** 20:.1f} MiB"


def restart_epoch_log(path, first_epoch, resumed):
    """Make the run log ``path`` (``log.jsonl``, a record per epoch) hold what this run continues.

    A resumed run keeps the records of the epochs before ``first_epoch`` and
    drops those it is about to train again (a run stopped and resumed, however
    often, has one record per epoch). A new run keeps an earlier run's log
    under ``log-<its date-time>.jsonl`` and starts an empty one.
    """
    if not os.path.isfile(path):
        return
    if not resumed:
        os.replace(path, _kept_name(path))
        return
    with open(path) as f:
        lines = f.read().splitlines()
    kept = [line for line in lines if (epoch := _epoch_of(line)) is not None and epoch < first_epoch]
    if kept != lines:
        atomic_write(path, lambda tmp: _write_lines(tmp, kept))


def _epoch_of(line):
    """The ``epoch`` of one JSON line, or None for a line that is not a record (half a line of a crash)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    epoch = record.get("epoch") if isinstance(record, dict) else None
    return epoch if isinstance(epoch, int) else None


def _write_lines(path, lines):
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


def _kept_name(path):
    """``log-<date-time of its last record>.jsonl`` beside ``path``, with ``-N`` added if that name is taken."""
    base, ext = os.path.splitext(path)
    stamp = datetime.datetime.fromtimestamp(os.path.getmtime(path)).strftime("%Y%m%d-%H%M%S")
    name, n = f"{base}-{stamp}{ext}", 1
    while os.path.exists(name):
        name, n = f"{base}-{stamp}-{n}{ext}", n + 1
    return name


class Behind:
    """Runs calls one at a time in a thread behind the caller, in the order given: predict.py's finishing of
    each photograph (outputs, row, line), train.py's checkpoints. At most one waits: ``submit`` first waits
    for the last call, and raises what it raised (a full disk stops the caller there), as does leaving the
    ``with`` block, which waits for the last call. ``workers`` 0: each call at once, in the caller's thread."""

    def __init__(self, workers=1):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="behind") if workers else None
        self.pending = None

    def submit(self, fn, *args):
        if self.pool is None:
            return fn(*args)
        self.wait()
        self.pending = self.pool.submit(fn, *args)

    def wait(self):
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()  # the call's error, if any, is raised here

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.wait()
        finally:
            if self.pool is not None:
                self.pool.shutdown()
