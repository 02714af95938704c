"""Where jaxsft keeps what it computes once per machine: `$JAXSFT_CACHE`, else ~/.cache/jaxsft.

Trained tokenizers, encoded data, the CPU's measured matmul peak, the compiled CPU BLAS call."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("JAXSFT_CACHE", Path.home() / ".cache" / "jaxsft"))
