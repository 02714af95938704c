"""One writer per run directory: `<run_dir>/run.lock` names the host and pid that train in it.

The lock file is created with O_EXCL, so of two `jaxsft train` on one directory exactly
one gets it; the other fails with one line naming the holder (`RunDirLocked`, exit code 4).
A lock left by a process that died (same host, its pid gone or reused by another process,
told apart by the process start time) is stale and is taken over. The take-over happens
under an flock on `run.lock.guard`, so two processes finding the same stale lock cannot
both take it (stale locks are only recognised on the holder's own host, where flock works).
Only process 0 of a multi-process run holds the lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from jaxsft.config import ConfigError
from jaxsft.train.faults import RunDirLocked

LOCK_NAME = "run.lock"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    started = _start_time(pid)
    return started is None or holder.get("started") in (None, started)


def _describe(holder: dict) -> str:
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {holder.get('since', '?')}"


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self.held = False

    def acquire(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._create():
                return self
            holder = self._read()
            if self._stale(holder) and self._take_over(holder):
                return self
        except OSError as e:
            raise ConfigError(f"train.run_dir={self.path.parent}: cannot write there ({e.strerror or e})") from None
        raise RunDirLocked(
            f"{self.path.parent} is in use by another jaxsft train ({_describe(self._read())}); "
            f"wait for it to finish or stop it (a lock of a dead process on its host is taken over)"
        )

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
            f.flush()
            os.fsync(f.fileno())
        self.held = True
        return True

    def _stale(self, holder: dict) -> bool:
        if not holder:  # empty: its writer died between creating and writing it, or is writing now
            try:
                return time.time() - self.path.stat().st_mtime > 10
            except FileNotFoundError:  # released meanwhile
                return True
        return holder.get("host") == self.me["host"] and not _alive(holder)

    def _read(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}  # being written, or damaged

    def _take_over(self, stale: dict) -> bool:
        with open(self.path.with_name(LOCK_NAME + ".guard"), "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            if self._read() != stale:  # someone else took it over first
                return False
            self.path.unlink(missing_ok=True)
            return self._create()

    def release(self) -> None:
        if self.held and self._read().get("pid") == self.me["pid"]:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
