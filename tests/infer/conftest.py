"""The infer/ tests share the tiny Hugging Face model helpers of tests/model."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "model"))
