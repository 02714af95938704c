"""SentencePiece: exact round trips, deterministic training, control pieces, the cache."""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsft.config import DataConfig
from jaxsft.data import synthetic
from jaxsft.data import tokenizer as tok_mod
from jaxsft.data.formats import DataError
from jaxsft.data.templates import ChatML
from jaxsft.data.tokenizer import SentencePieceTokenizer, load_or_train, train_sentencepiece

SPECIALS = ChatML.special_pieces


def _texts(n: int = 2000) -> list[str]:
    return [m["content"] for r in synthetic.generate(n, 0, "train") for m in r["messages"]] + ["user\n", "\n"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> SentencePieceTokenizer:
    path = tmp_path_factory.mktemp("tok") / "t.model"
    train_sentencepiece(_texts(), 512, path, SPECIALS)
    return SentencePieceTokenizer(path)


def test_special_ids_and_vocab(tokenizer):
    assert tokenizer.vocab_size == 512
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (1, 2, None)
    start, end = tokenizer.piece_id("<|im_start|>"), tokenizer.piece_id("<|im_end|>")
    assert len({start, end, tokenizer.pad_id, tokenizer.eos_id}) == 4
    assert tokenizer.is_control(start) and tokenizer.is_control(end)
    with pytest.raises(KeyError, match="no piece"):
        tokenizer.piece_id("<|not_a_piece|>")


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "  two  spaces ",
        "\n",
        "a\n\nb\r\n",
        "\ttab",
        "héllo wörld",
        "日本語のテキスト",
        "emoji 🙂👍🏽",
        "12345 + 678",
        "<|im_start|>assistant\nhi<|im_end|>",
        "\x00\x01 control",
        "trailing   ",
    ],
)
def test_round_trip_examples(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


# U+2581 is SentencePiece's internal space symbol and decodes as " " (documented limit);
# surrogates cannot be UTF-8 encoded at all.
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), max_size=40)


@settings(max_examples=60, deadline=None)
@given(TEXT)
def test_round_trip_any_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_markers_in_text_are_never_special(tokenizer):
    specials = {tokenizer.piece_id(p) for p in SPECIALS}
    for text in ("<|im_start|>", "<|im_end|>", "x<|im_start|>assistant\n<|im_end|>y", "<|im_start|><|im_start|>"):
        assert specials.isdisjoint(tokenizer.encode(text))


def test_training_is_deterministic(tmp_path):
    texts = _texts(500)
    first = train_sentencepiece(texts, 400, tmp_path / "a.model", SPECIALS)
    second = train_sentencepiece(texts, 400, None, SPECIALS)
    assert first == second == (tmp_path / "a.model").read_bytes()
    assert len(first) > 1000


def test_load_or_train_caches_by_content(tmp_path, monkeypatch):
    calls = []
    real = tok_mod.train_sentencepiece
    monkeypatch.setattr(tok_mod, "train_sentencepiece", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = DataConfig(tokenizer_vocab_size=400)
    texts = _texts(300)
    first = load_or_train(cfg, lambda: texts, tmp_path, SPECIALS)
    second = load_or_train(cfg, lambda: iter(texts), tmp_path, SPECIALS)
    assert len(calls) == 1 and first.path == second.path
    assert Path(first.path).parent == tmp_path / "tokenizers"
    assert list((tmp_path / "tokenizers").iterdir()) == [Path(first.path)]  # no temp file left
    third = load_or_train(cfg, lambda: texts[:-5], tmp_path, SPECIALS)  # other data: a new model
    assert len(calls) == 2 and third.path != first.path


def test_configured_tokenizer_is_loaded_or_named_when_missing(tmp_path, tokenizer):
    loaded = load_or_train(DataConfig(tokenizer=tokenizer.path), lambda: [], tmp_path)
    assert loaded.encode("sort these words") == tokenizer.encode("sort these words")
    with pytest.raises(DataError, match=r"^data\.tokenizer: SentencePiece model .*missing\.model does not exist$"):
        load_or_train(DataConfig(tokenizer=str(tmp_path / "missing.model")), lambda: [], tmp_path)


PRIMED = ["Sort these words: pear apple", "héllo wörld 🙂", "", "  two  spaces ", "12345 + 678", "pear apple"]


@pytest.mark.parametrize("library", ["sentencepiece", "hf"])
def test_primed_batch_encoding_gives_the_ids_of_one_by_one(library, spm_all, hf_tokenizers):
    tok = spm_all if library == "sentencepiece" else next(iter(hf_tokenizers.values()))
    expected = [tok.encode(t) for t in PRIMED]
    tok.prime(PRIMED + PRIMED[:2])  # repeats are fine
    assert [tok.encode(t) for t in PRIMED] == expected
    assert tok.encode("not primed") == tok.encode("not primed")
    tok.prime([])
    assert not tok._primed and [tok.encode(t) for t in PRIMED] == expected


def test_a_tokenizer_that_pads_batches_is_not_primed(hf_tokenizers):
    tok = next(iter(hf_tokenizers.values()))
    tok._tok.enable_padding(length=64)
    try:
        tok.prime(PRIMED)
        assert tok._primed == {}
    finally:
        tok._tok.no_padding()
