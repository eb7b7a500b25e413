"""The scripts re-execute themselves once with a fast allocator preloaded, and UNET_ALLOCATOR chooses it."""
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_script
from train_utils import allocator

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")

# Prints the allocator libraries mapped into the process after use_fast_allocator() has run.
PROBE = ("from train_utils.allocator import use_fast_allocator; use_fast_allocator(); import os; "
         "maps = open('/proc/self/maps').read(); "
         "print('MAPPED', sorted(n for n in ('tcmalloc', 'mimalloc') if n in maps), os.getpid())")


def probe(choice):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UNET_ALLOCATOR", "MIMALLOC_"))}
    env.pop("LD_PRELOAD", None)
    env["UNET_ALLOCATOR"] = choice
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("name,find", [("mimalloc", allocator.find_mimalloc), ("tcmalloc", allocator.find_tcmalloc)])
def test_preloads_the_allocator_asked_for(name, find):
    if find() is None:
        pytest.skip(f"{name} is not installed here")
    out = probe(name)
    assert out.splitlines()[0] == f"memory allocator: {name} (preloaded; UNET_ALLOCATOR=system keeps glibc's malloc)"
    assert f"MAPPED ['{name}']" in out  # the library is really in the re-executed process


def test_system_keeps_glibc():
    out = probe("system")
    assert "memory allocator" not in out and "MAPPED []" in out


def test_auto_prefers_tcmalloc_then_mimalloc(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator, "find_mimalloc", lambda: "/x/libmimalloc.so")
    assert allocator.choose("auto") == ("tcmalloc", "libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    assert allocator.choose("auto") == ("mimalloc", "/x/libmimalloc.so")
    monkeypatch.setattr(allocator, "find_mimalloc", lambda: None)
    assert allocator.choose("auto") == ("system", None)
    assert allocator.choose("tcmalloc") == ("tcmalloc", None)  # asked for and absent: a note, then glibc
    with pytest.raises(ValueError, match="UNET_ALLOCATOR=jemalloc"):
        allocator.choose("jemalloc")


def test_scripts_say_which_allocator_they_run_with(tmp_path):
    if allocator.choose("auto")[1] is None:
        pytest.skip("no fast allocator installed here")
    name = allocator.choose("auto")[0]
    r = run_script("predict.py", "--img", tmp_path / "absent.png", env={"UNET_ALLOCATOR": "auto"})
    assert r.returncode == 1 and r.stdout.startswith(f"memory allocator: {name}")
    assert r.stderr.strip() == f"error: input '{tmp_path / 'absent.png'}' does not exist"
