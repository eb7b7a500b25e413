"""The optional packages (``requirements-extras.txt``): a missing one is a one-line ``UserError``, not a traceback."""
import importlib
import importlib.util
import sys

from .errors import UserError

EXTRAS_FILE = "requirements-extras.txt"


def available(module):
    """Whether ``module`` can be imported, without importing it (a module blocked in sys.modules counts as missing)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_message(purpose, packages):
    names = " ".join(packages)
    return f"{purpose} needs the optional package{'s' * (len(packages) > 1)} {', '.join(packages)}: " \
           f"pip install {names} (or pip install -r {EXTRAS_FILE})"


def require(purpose, *modules, packages=None):
    """Import and return ``modules``; a ``UserError`` naming what to install when one is missing.

    ``packages`` are the pip names, when they differ from the module names.
    """
    packages = list(packages or modules)
    loaded = []
    for module in modules:
        try:
            loaded.append(importlib.import_module(module))
        except ImportError as e:
            detail = f" ({' '.join(str(e).split())})" if available(module) else ""
            raise UserError(missing_message(purpose, packages) + detail) from None
    return loaded[0] if len(loaded) == 1 else tuple(loaded)
