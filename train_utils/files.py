"""Writing files safely: a folder proven writable before long work, and writes that never leave half a file."""
import os

from .errors import UserError


def temp_name(path, suffix=""):
    """The temporary name ``path`` is written under: hidden, in the same folder (so the rename is atomic)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp{os.getpid()}{suffix}")


def atomic_write(path, write, suffix="", durable=False):
    """Call ``write(tmp)`` for a temporary file beside ``path``, then rename it to ``path``.

    A crash, a full disk or a failing ``write`` at any moment leaves the
    previous ``path`` as it was, and the temporary file is removed. ``suffix``
    keeps the extension writers that look at it need (``.png``); ``durable``
    also flushes the file and the rename to the disk (checkpoints).
    """
    tmp = temp_name(path, suffix)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
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


def ensure_writable_folder(folder, what):
    """Create ``folder`` and prove a file can be written in it; a ``UserError`` naming ``what`` if not."""
    probe = os.path.join(folder, f".write-test-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to {what}: {e.strerror or e}") from None
