"""What makes a checkpoint trustworthy: a checksum manifest and finite values.

After Orbax has finalised a step, `write_manifest` records the size and sha256 of every
file under `<checkpoints>/<step>/` in `<step>/jaxsft_manifest.json` (written last, atomically:
a step without it was never verified). `problem(step_dir)` re-reads the files and names the
first that is missing, short, or changed. `all_finite(tree)` is one device reduction over
the floating-point leaves, run at save and at restore time only.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp

MANIFEST = "jaxsft_manifest.json"
_CHUNK = 8 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)  # hashlib releases the GIL: files hash in parallel threads
    return digest.hexdigest()


def _files(step_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def _hash_all(step_dir: Path, names: list[str]) -> list[str]:
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda n: _sha256(step_dir / n), names))


def write_manifest(step_dir: Path, step: int) -> None:
    names = _files(step_dir)
    files = {
        n: {"bytes": (step_dir / n).stat().st_size, "sha256": h} for n, h in zip(names, _hash_all(step_dir, names))
    }
    tmp = step_dir / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(step_dir / MANIFEST)


def has_manifest(step_dir: Path) -> bool:
    return (step_dir / MANIFEST).is_file()


def problem(step_dir: Path) -> str | None:
    """None when every file matches the manifest, else one line naming the first bad file."""
    try:
        files = json.loads((step_dir / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST} (the run stopped before the save was verified)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is unreadable"
    for name, expected in files.items():
        path = step_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, expected {expected['bytes']}"
    names = list(files)
    for name, digest in zip(names, _hash_all(step_dir, names)):
        if digest != files[name]["sha256"]:
            return f"{step_dir / name} does not match its sha256"
    return None


@jax.jit
def _finite(leaves) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.bool_(True)]))


def all_finite(tree) -> bool:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return bool(_finite(leaves))
