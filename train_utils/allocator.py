"""A fast memory allocator for the scripts: they re-execute themselves once with tcmalloc or mimalloc preloaded.

Why: most activation tensors of the U-Net (a 4 x 32 x 480 x 480 float map is
118 MB) are larger than the largest threshold above which glibc's malloc maps
memory straight from the kernel (32 MB). glibc then maps every such tensor
fresh, the kernel zeroes it page by page, and it is unmapped again when freed:
at every training step, about a quarter of the CPU time went to page faults.
tcmalloc and mimalloc keep freed memory and hand it out again.

``UNET_ALLOCATOR`` chooses: ``auto`` (the default: tcmalloc when the system
has it, else mimalloc from the ``cmeel-mimalloc`` wheel that requirements.txt
installs, else glibc's), ``tcmalloc``, ``mimalloc``, or ``system`` to keep
glibc's malloc. Only Linux is handled (``LD_PRELOAD``); elsewhere nothing changes.
This module imports nothing heavy: it runs before torch is loaded.
"""
import ctypes.util
import glob
import os
import sys

ENV_CHOICE = "UNET_ALLOCATOR"
ENV_ACTIVE = "UNET_ALLOCATOR_ACTIVE"  # set in the re-executed process: the allocator it runs with
_ANNOUNCE = "UNET_ALLOCATOR_ANNOUNCE"

def find_tcmalloc():
    """The shared library name of the system's tcmalloc (the minimal build first), or None."""
    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def find_mimalloc():
    """The path of ``libmimalloc.so`` from the ``cmeel-mimalloc`` wheel on ``sys.path``, or None."""
    for entry in sys.path:
        hits = sorted(glob.glob(os.path.join(entry or ".", "cmeel.prefix", "lib", "libmimalloc.so*")))
        if hits:
            return hits[0]
    return None


def choose(choice="auto"):
    """(name, library) for ``UNET_ALLOCATOR=choice``; library None means glibc's malloc.

    tcmalloc comes first: over whole epochs its peak memory equals glibc's.
    mimalloc runs with its default settings; keeping freed memory
    (``MIMALLOC_PURGE_DELAY=-1``) made its training steps faster still but raised
    an epoch's peak memory (docs/benchmarks.md, "Memory allocator").
    """
    choice = (choice or "auto").strip().lower()
    if choice in ("system", "glibc", "off", "none", "0"):
        return "system", None
    if choice in ("auto", "tcmalloc"):
        lib = find_tcmalloc()
        if lib or choice == "tcmalloc":
            return "tcmalloc", lib
    if choice in ("auto", "mimalloc"):
        lib = find_mimalloc()
        if lib or choice == "mimalloc":
            return "mimalloc", lib
    if choice != "auto":
        raise ValueError(f"{ENV_CHOICE}={choice}: use auto, tcmalloc, mimalloc or system")
    return "system", None


def use_fast_allocator():
    """Re-execute this process with a fast allocator preloaded (once), and say which one it runs with.

    Call it first thing in a script's ``__main__`` block, before torch is imported.
    The re-executed process keeps its pid, arguments and environment, so torchrun,
    SLURM and shells see no difference; torchrun's workers each do the same.
    """
    if not sys.platform.startswith("linux"):
        return
    if os.environ.get(ENV_ACTIVE):
        if os.environ.pop(_ANNOUNCE, None) and os.environ.get("RANK", "0") == "0":
            print(f"memory allocator: {os.environ[ENV_ACTIVE]} (preloaded; {ENV_CHOICE}=system keeps glibc's malloc)",
                  flush=True)
        return
    try:
        name, lib = choose(os.environ.get(ENV_CHOICE, "auto"))
    except ValueError as e:
        sys.exit(f"error: {e}")
    if lib is None:
        if name != "system":
            print(f"note: {ENV_CHOICE}={name} asked for, but {name} was not found; using glibc's malloc", flush=True)
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = lib + (":" + env["LD_PRELOAD"] if env.get("LD_PRELOAD") else "")
    env[ENV_ACTIVE] = name
    env[_ANNOUNCE] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]  # orig_argv keeps -u, -X, ...
    os.execve(sys.executable, argv, env)
