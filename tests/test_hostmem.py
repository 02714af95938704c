"""malloc's tunables (jaxsft/hostmem.py): the environment it re-executes with, and its effect."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from jaxsft import hostmem

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="glibc's malloc tunables: Linux with glibc only")


@needs_glibc
def test_the_tunables_are_added_once_and_never_over_the_users():
    assert hostmem.tunables_env({})["GLIBC_TUNABLES"] == hostmem.TUNABLES
    mine = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h"}
    env = hostmem.tunables_env(mine)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{hostmem.TUNABLES}" and env["HOME"] == "/h"
    assert hostmem.tunables_env(env) is None  # set: no second exec
    assert hostmem.tunables_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's choice
    assert hostmem.tunables_env({"JAXSFT_MALLOC_TUNABLES": "0"}) is None


_PROBE = """
import ctypes, os, resource, sys
from jaxsft import hostmem
hostmem.reexec_with_tunables()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # 64 MiB through malloc (numpy madvises its own), first-touched: a fresh mapping each time
    chunk = libc.malloc(64 << 20)
    ctypes.memset(chunk, 1, 64 << 20)
    libc.free(chunk)
print(os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(env_extra: dict) -> tuple[str, str, int]:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXSFT_MALLOC_TUNABLES")}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, "a", "b"], env={**env, **env_extra}, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], " ".join(out[1:-1]), int(out[-1])


@needs_glibc
def test_a_reexecuted_process_keeps_its_arguments_and_faults_in_huge_pages():
    tunables, args, faults = _probe({})
    assert tunables == hostmem.TUNABLES and args == "['a', 'b']"
    off_tunables, _, off_faults = _probe({"JAXSFT_MALLOC_TUNABLES": "0"})
    assert off_tunables == "None"
    assert off_faults > 10 * 16_000  # 640 MiB first-touched in 4-KiB pages
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():
        assert faults < off_faults / 10  # 2-MiB pages where the kernel has them: measured 5,440 against 163,850
