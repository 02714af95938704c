"""Host memory: glibc malloc backs its large chunks with transparent huge pages, set at process start.

Why: XLA's CPU runtime allocates a step's buffers afresh at every execution, and glibc serves
every chunk above its mmap threshold (at most 32 MiB) with a new mapping, so each step
first-touches its whole working set again. The S train step of bench/vs_hf.py faulted in
210,000 4-KiB pages (860 MB) per step: 0.47 s of system time in a 1.48 s step. With
`glibc.malloc.hugetlb=1` malloc asks for transparent huge pages on those mappings (512x fewer
faults; the kernel's `madvise` mode, the common default, honours it): 1,300 faults and
1.26 s a step (bench/NOTES.md). It changes where memory comes from, never a number computed.

glibc reads its tunables only when a process starts, so the `jaxsft` command re-executes
itself once with them added to `GLIBC_TUNABLES` (same process id, same arguments).
`JAXSFT_MALLOC_TUNABLES=0` turns it off; elsewhere than Linux with glibc it does nothing.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLES = "glibc.malloc.hugetlb=1"
_OFF = "JAXSFT_MALLOC_TUNABLES"


def tunables_env(environ: dict[str, str]) -> dict[str, str] | None:
    """The environment to re-execute with, or None where nothing is to be done."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or environ.get(_OFF) == "0":
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:  # set already: by an earlier exec, or by the user
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [current, TUNABLES]))}


def reexec_with_tunables() -> None:
    """Replaces this process by itself with the tunables set (returns only where it does nothing).

    Call it first thing, before any thread or heavy import exists."""
    env = tunables_env(dict(os.environ))
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
