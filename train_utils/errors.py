"""User-facing errors and the wrapper that turns them into one line and an exit code."""
import os
import sys
import traceback


class UserError(Exception):
    """A problem with the user's input (paths, files, flags): shown as one line, no traceback."""


def run_cli(main, *args, debug=False):
    """Run ``main(*args)``; report a failure as one ``error:`` line and exit non-zero.

    Set ``--debug`` (passed as ``debug``) or ``UNET_DEBUG=1`` to see the traceback.
    """
    debug = debug or os.environ.get("UNET_DEBUG", "") not in ("", "0")
    try:
        return main(*args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - every failure becomes one readable line
        if debug:
            traceback.print_exc()
        kind = "" if isinstance(e, UserError) else f"{type(e).__name__}: "
        if type(e).__module__.startswith("torch.distributed") or "DistBackendError" in type(e).__name__:
            kind = "a process of the distributed run failed or timed out (see its own error above): " + kind
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {kind}{msg}", file=sys.stderr)
        sys.exit(1)
