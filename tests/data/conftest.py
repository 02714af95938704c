"""Shared tokenizers: one SentencePiece model with every built-in template's control
pieces, and Hugging Face directories (tests/data/hf_fixtures.py), built once per session."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from jaxsft.data import synthetic  # noqa: E402
from jaxsft.data.templates import BUILTIN  # noqa: E402
from jaxsft.data.tokenizer import SentencePieceTokenizer, load_tokenizer, train_sentencepiece  # noqa: E402

ALL_SPECIALS = tuple(dict.fromkeys(p for t in BUILTIN.values() for p in t.special_pieces))


@pytest.fixture(scope="session")
def spm_all(tmp_path_factory) -> SentencePieceTokenizer:
    texts = [m["content"] for r in synthetic.generate(1000, 0, "train") for m in r["messages"]]
    path = tmp_path_factory.mktemp("spm") / "all.model"
    train_sentencepiece(
        texts + ["user\n", "assistant\n", "system\n", "\n", "### Instruction:\n"], 600, path, ALL_SPECIALS
    )
    return SentencePieceTokenizer(path)


@pytest.fixture(scope="session")
def hf_base(tmp_path_factory) -> Path:
    import hf_fixtures

    base = tmp_path_factory.mktemp("hf")
    hf_fixtures.build_bpe(base)
    return base


@pytest.fixture(scope="session")
def hf_tokenizers(hf_base):
    import hf_fixtures

    return {style: load_tokenizer(f"hf:{hf_fixtures.hf_dir(hf_base, style)}") for style in hf_fixtures.STYLES}
