"""User-facing errors and the wrapper that reports a failure and sets the exit code."""
import os
import sys
import traceback


class UserError(Exception):
    """A problem with the user's input (paths, files, flags): shown as one line, no traceback."""


def _is_distributed_failure(e):
    return type(e).__module__.startswith("torch.distributed") or "DistBackendError" in type(e).__name__


def run_cli(main, *args, debug=False):
    """Run ``main(*args)``; on failure print ``error: ...`` to stderr and exit non-zero.

    Bad input and bad flags (``UserError``) and a lost process of a distributed
    run are one line. Anything else is a bug, an out-of-memory or a model that
    does not fit its input: its traceback is printed first, since that is what
    finds it. ``--debug`` (``debug``) or ``UNET_DEBUG=1`` shows every traceback.
    Every process reports its own failure, whatever its rank: the rank is named
    when there are several.
    """
    debug = debug or os.environ.get("UNET_DEBUG", "") not in ("", "0")
    rank = os.environ.get("RANK") if "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1" else None
    prefix = "error" if rank is None else f"error (rank {rank})"
    try:
        return main(*args)
    except KeyboardInterrupt:
        _report(f"{prefix}: interrupted")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - every failure is reported, then the exit code says it failed
        one_line = isinstance(e, UserError) or _is_distributed_failure(e)
        if debug or not one_line:
            traceback.print_exc()
        kind = "" if isinstance(e, UserError) else f"{type(e).__name__}: "
        if _is_distributed_failure(e):
            kind = "a process of the distributed run failed or timed out (see its own error above): " + kind
        _report(f"{prefix}: {kind}{' '.join(str(e).split()) or type(e).__name__}")
        sys.exit(1)


def _report(line):
    # Straight to stderr: under DDP ``print`` is silenced on every process but the main one.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
