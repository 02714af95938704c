"""One `Tokenizer` protocol, a SentencePiece implementation, and in-process SPM training.

Contract:
- `encode(text)` is for plain text only: special pieces are never produced from text.
  Templates insert them by id (`piece_id`). This holds because the template's markers
  are SentencePiece *control* symbols; *user-defined* symbols would be matched inside
  raw text, so a user typing "<|im_start|>" would forge a turn (see TRAPS.md).
- `decode(encode(s)) == s` for any string without U+2581 ("▁"): the trainer below uses
  identity normalisation, no dummy prefix, kept whitespace and byte fallback.
  SentencePiece writes spaces as U+2581 internally, so a literal "▁" decodes as a space.
- `train_sentencepiece` is deterministic: the same texts give a byte-identical model.
- `load_tokenizer(spec)` loads `path/to/x.model` (SentencePiece) or `hf:/model/dir`
  (a Hugging Face `tokenizer.json`, hf_tokenizer.py); both keep this contract.
- `load_or_train(cfg, texts, cache_dir)` loads `cfg.tokenizer`, or trains one on the
  texts and caches it under `cache_dir/tokenizers/<sha256>.model`, keyed by everything
  that shapes the model, so a second run with the same data reuses it.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

import sentencepiece as spm

from jaxsft.config import DataConfig
from jaxsft.data.formats import DataError

# At most this many texts (message segments) train a tokenizer: 20k give a 512-piece BPE
# vocabulary in well under a second, and more would only slow the first run.
MAX_TRAINING_TEXTS = 20000
MODEL_TYPE = "bpe"  # unigram with a hard vocab limit can fail on tiny corpora
# Bumped when the options below change, so cached models trained otherwise are not reused.
TRAINER_VERSION = 1
UNK, PAD, EOS = "<unk>", "<pad>", "</s>"


class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def bos_id(self) -> int | None: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def piece_id(self, piece: str) -> int: ...


class SentencePieceTokenizer:
    """A SentencePiece model behind the `Tokenizer` protocol."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._sp = spm.SentencePieceProcessor(model_file=self.path)

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def pad_id(self) -> int:
        # Models trained elsewhere often have no pad piece; padding carries weight 0,
        # so any real id works, and eos (else unk) is the conventional one.
        for candidate in (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id()):
            if candidate >= 0:
                return candidate
        return 0

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int | None:
        return self._sp.bos_id() if self._sp.bos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        primed = self.__dict__.get("_primed")
        if primed and text in primed:
            return primed[text]
        return self._sp.encode(text)

    def prime(self, texts: Sequence[str]) -> None:
        """Encodes `texts` in one call on the library's threads, for the `encode` calls that
        follow (the same ids); `prime([])` forgets them."""
        self._primed = dict(zip(texts, self._sp.encode(list(texts)))) if texts else {}

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def piece_id(self, piece: str) -> int:
        i = self._sp.piece_to_id(piece)
        if self._sp.id_to_piece(i) != piece:  # unknown pieces map to unk silently
            raise KeyError(f"tokenizer {self.path} has no piece {piece!r}")
        return i

    def is_control(self, i: int) -> bool:
        return self._sp.is_control(i)

    def piece(self, i: int) -> str:
        """The piece's own text (control pieces decode to nothing; this names them)."""
        return self._sp.id_to_piece(int(i))

    @property
    def special_tokens(self) -> dict[str, int]:
        """Control pieces (never produced by `encode`) by text."""
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size) if self._sp.is_control(i)}

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self._sp.id_to_piece(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id < 0 else self._sp.id_to_piece(self.eos_id)

    chat_template = None  # SentencePiece models carry no chat template

    def save(self, run_dir: str | Path) -> Path:
        """Copies the model into `run_dir/tokenizer.model`; returns that path."""
        out = Path(run_dir) / "tokenizer.model"
        if Path(self.path).resolve() != out.resolve():
            shutil.copyfile(self.path, out)
        return out


HF_PREFIX = "hf:"


def load_tokenizer(spec: str):
    """`x.model` -> SentencePiece; `hf:/dir` -> Hugging Face tokenizer.json (+ config)."""
    if spec.startswith(HF_PREFIX):
        from jaxsft.data.hf_tokenizer import HFTokenizer

        directory = Path(spec[len(HF_PREFIX) :]).expanduser()
        if not directory.is_dir():
            raise DataError(f"data.tokenizer: {spec}: {directory} is not a directory")
        return HFTokenizer(directory)
    if not Path(spec).is_file():
        raise DataError(f"data.tokenizer: SentencePiece model {spec} does not exist")
    return SentencePieceTokenizer(spec)


def _sample(texts: list[str], limit: int) -> list[str]:
    """An evenly spaced, order-preserving subset: deterministic, and not just the head."""
    if len(texts) <= limit:
        return texts
    return [texts[i * len(texts) // limit] for i in range(limit)]


def train_sentencepiece(
    texts: Iterable[str], vocab_size: int, out_path: str | Path | None, special_pieces: Sequence[str]
) -> bytes:
    """Trains a BPE model; writes it to `out_path` (if given) and returns its bytes."""
    model = io.BytesIO()
    try:
        _train(texts, vocab_size, model, special_pieces)
    except RuntimeError as e:
        # SentencePiece reports a too-small vocabulary as an internal error with a C++ path.
        raise DataError(
            f"data.tokenizer_vocab_size={vocab_size}: SentencePiece training failed: "
            f"{str(e).split('] ')[-1].split('. Increase')[0]}"
        ) from None
    data = model.getvalue()
    if out_path is not None:
        _write_atomic(Path(out_path), data)
    return data


def _train(texts: Iterable[str], vocab_size: int, model: io.BytesIO, special_pieces: Sequence[str]) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=MODEL_TYPE,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        control_symbols=list(special_pieces),
        unk_id=0,
        pad_id=1,
        eos_id=2,
        bos_id=-1,
        unk_piece=UNK,
        pad_piece=PAD,
        eos_piece=EOS,
        # One thread and no internal sampling: the model depends on the texts alone.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        hard_vocab_limit=False,
        max_sentence_length=1 << 16,
        minloglevel=2,
    )


def _write_atomic(path: Path, data: bytes) -> None:
    # Several processes may train the same cached model at once; a rename is atomic,
    # so readers see either no file or a whole one.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def cache_key(texts: Sequence[str], vocab_size: int, special_pieces: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(repr((TRAINER_VERSION, MODEL_TYPE, vocab_size, tuple(special_pieces), len(texts))).encode())
    for t in texts:
        h.update(len(t).to_bytes(8, "little"))  # length-prefixed: no two lists collide
        h.update(t.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def load_or_train(
    cfg: DataConfig,
    texts: Callable[[], Iterable[str]],
    cache_dir: Path,
    special_pieces: Sequence[str] = ("<|im_start|>", "<|im_end|>"),
):
    """`cfg.tokenizer` if set, else a model trained on `texts()` (cached by content)."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    sample = _sample(list(texts()), MAX_TRAINING_TEXTS)
    if not sample:
        raise DataError("data: no texts to train a tokenizer on (set data.tokenizer or give training data)")
    key = cache_key(sample, cfg.tokenizer_vocab_size, special_pieces)
    path = Path(cache_dir) / "tokenizers" / f"{key}.model"
    if not path.is_file():
        train_sentencepiece(sample, cfg.tokenizer_vocab_size, path, special_pieces)
    return SentencePieceTokenizer(path)
