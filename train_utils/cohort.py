"""Folder runs of predict.py that finish and resume: a run's CSV files written a whole row at a time, which
photographs are already done, the share of each torchrun process, reading ahead and writing behind the
network in threads, and the progress line with the rate."""
import csv
import datetime
import errno
import hashlib
import io
import itertools
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from .errors import UserError
from .files import DISK_FULL, DiskFullError, atomic_write

FAILURES_CSV = "failures.csv"
FAILURE_COLUMNS = ("image", "error")


class RowLog:
    """A CSV file with one row per photograph, keyed by its ``image`` column, written a whole row at a time.

    Each row is one ``write`` to the file opened for appending, so a run stopped at any moment leaves whole
    rows; a short write (a full disk) is cut off again, and a line a crash of the machine left unfinished is
    dropped when the file is read. A torchrun process (``rank`` given) appends to a part file of its own
    beside it, ``<name>.part<rank>.csv``, and ``merge`` gathers the parts into the one file.
    """

    def __init__(self, path, columns, rank=None):
        self.path = path
        self.columns = tuple(columns)
        self.own = path if rank is None else part_name(path, rank)
        self._header = _csv_line(self.columns)

    def read(self):
        """Every row of the file and of the part files beside it, by image (the last one wins)."""
        rows = {}
        for path in [self.path, *self._parts()]:
            for row in read_rows(path, self.columns):
                rows.pop(row["image"], None)  # in the order last added
                rows[row["image"]] = row
        return rows

    def append(self, row):
        data = _csv_line([row.get(c, "") for c in self.columns])
        fd = os.open(self.own, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                data = self._header + data
            try:
                written = os.write(fd, data)
            except OSError as e:
                written, error = -1, e
            else:
                error = None
            if written != len(data):
                os.ftruncate(fd, size)  # never half a row
                code = getattr(error, "errno", errno.ENOSPC)  # a short write: the disk had no room for more
                if code not in DISK_FULL:
                    raise error
                raise DiskFullError(f"cannot add a row to '{self.own}': {DISK_FULL[code]} (errno "
                                    f"{errno.errorcode[code]}); its earlier rows are unchanged")
        finally:
            os.close(fd)

    def merge(self):
        """The file written whole with every row of it and of its part files (one a photograph, the last one
        added), which are then removed; nothing is written when there is nothing to gather."""
        parts = self._parts()
        rows = self.read()
        if not parts and len(rows) == len(read_rows(self.path, self.columns)):
            return
        text = self._header + b"".join(_csv_line([r.get(c, "") for c in self.columns]) for r in rows.values())
        atomic_write(self.path, lambda tmp: write_bytes(tmp, text))
        for part in parts:
            os.remove(part)

    def reset(self):
        """No rows: the file and its parts removed (the failures of a run that is tried again)."""
        for path in [self.path, *self._parts()]:
            if os.path.exists(path):
                os.remove(path)

    def _parts(self):
        folder, name = os.path.split(os.path.abspath(self.path))
        stem = os.path.splitext(name)[0] + ".part"
        if not os.path.isdir(folder):
            return []
        return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                      if n.startswith(stem) and n.endswith(".csv") and n[len(stem):-4].isdigit())


def write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


def part_name(path, rank):
    return f"{os.path.splitext(path)[0]}.part{rank}.csv"


def _csv_line(values):
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(values)
    return out.getvalue().encode()


def read_rows(path, columns):
    """The whole rows of the CSV file ``path`` (none if it does not exist); other columns are a UserError."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        text = f.read()
    if not text.endswith("\n"):  # the last line was being written when the machine stopped
        text = text[:text.rfind("\n") + 1]
    lines = list(csv.reader(io.StringIO(text)))
    if not lines:
        return []
    if tuple(lines[0]) != tuple(columns):
        found = ",".join(lines[0][:4]) + (",..." if len(lines[0]) > 4 else "")
        raise UserError(f"'{path}' exists and is not a {os.path.basename(path)} of these columns (it has {found}): "
                        "move it away or write elsewhere (nothing was changed)")
    return [dict(zip(columns, line)) for line in lines[1:] if len(line) == len(columns)]


def is_done(outputs, image, logs=()):
    """Whether a photograph needs no work: each of its output files exists (they are written whole, so they
    are complete) and each of ``logs`` has its row."""
    return all(os.path.exists(p) for p in outputs) and all(image in rows for rows in logs)


def share(items, rank, world_size):
    """The items one of ``world_size`` processes takes: every ``world_size``-th from ``rank``."""
    return items[rank::world_size]


class Progress:
    """``[k/N, 3.1 photographs/min, about 0:41:00 left]`` over the photographs this run finishes."""

    def __init__(self, total):
        self.total = total
        self.finished = 0
        self.start = time.perf_counter()

    def step(self):
        self.finished += 1
        elapsed = time.perf_counter() - self.start
        rate = self.finished / elapsed * 60 if elapsed > 0 else 0.0
        left = (self.total - self.finished) / rate * 60 if rate > 0 else 0.0
        return (f"[{self.finished}/{self.total}, {rate:.1f} photographs/min, "
                f"about {datetime.timedelta(seconds=round(left))} left]")


class RunRecord:
    """``predict_run.json`` in an output folder: what made its outputs (the model file's digest and the
    settings that change a mask), so that a run resumes only the same command's work."""

    NAME = "predict_run.json"

    def __init__(self, folder, settings):
        self.path = os.path.join(folder, self.NAME)
        self.settings = json.loads(json.dumps(settings))  # as it reads back

    def exists(self):
        return os.path.exists(self.path)

    def matches(self):
        try:
            with open(self.path) as f:
                return json.load(f) == self.settings
        except (OSError, ValueError):
            return False

    def write(self):
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        text = json.dumps(self.settings, indent=1) + "\n"
        atomic_write(self.path, lambda tmp: write_bytes(tmp, text.encode()))


def file_digest(path, chunk=1 << 20):
    """The SHA-256 of a file, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def failure_reason(error):
    """One photograph's failure as one line: a ``UserError``'s message, anything else's type and message."""
    reason = " ".join(str(error).split()) or type(error).__name__
    return reason if isinstance(error, UserError) else f"{type(error).__name__}: {reason}"


def attempt(fn, *args):
    """``fn(*args)``, or the exception it raised: one photograph's failure stays its own."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - recorded for that photograph; the run goes on
        return e


def read_ahead(items, read, workers):
    """``(item, read(item) or its exception)`` in order; ``workers`` threads read that many items ahead while
    the caller works on the current one (0: each read when its turn comes)."""
    if workers == 0:
        for item in items:
            yield item, attempt(read, item)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="read") as pool:
        queue, rest = deque(), iter(items)
        for item in itertools.islice(rest, workers):
            queue.append((item, pool.submit(attempt, read, item)))
        while queue:
            item, future = queue.popleft()
            following = next(rest, None)
            if following is not None:
                queue.append((following, pool.submit(attempt, read, following)))
            yield item, future.result()


def say(line, err=False):
    """A line from any process (under torchrun ``print`` speaks only for the first)."""
    stream = sys.stderr if err else sys.stdout
    stream.write(line + "\n")
    stream.flush()
