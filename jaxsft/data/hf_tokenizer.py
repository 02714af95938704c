"""A Hugging Face `tokenizer.json` behind the `Tokenizer` protocol (see tokenizer.py).

Contract:
- `HFTokenizer(directory)` reads `tokenizer.json`, and when present
  `tokenizer_config.json` (bos/eos/pad token names, `chat_template`) and
  `chat_template.jinja` (where transformers >= 4.43 saves the template). Files are data:
  nothing in them executes (the chat template renders in a sandbox, hf_template.py).
- `encode(text)` tokenizes plain text only: special tokens typed in the text are split
  like any other text (`encode_special_tokens`), and no BOS/EOS is added (templates insert
  those by id, so they are never doubled).
- Pickles as its directory (Grain worker processes reload it).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxsft.data.formats import DataError

FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def _token_name(value: Any) -> str | None:
    """`"<s>"` or `{"content": "<s>", ...}` (older configs) -> "<s>"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"data.tokenizer: cannot read {path}: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise DataError(f"data.tokenizer: {path} is not a JSON object")
    return data


def _chat_template(directory: Path, config: dict) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


class HFTokenizer:
    """`tokenizer.json` (+ `tokenizer_config.json`) from a Hugging Face model directory."""

    def __init__(self, directory: str | Path):
        import tokenizers

        self.path = str(directory)
        directory = Path(directory)
        if not (directory / "tokenizer.json").is_file():
            raise DataError(f"data.tokenizer: {directory} has no tokenizer.json (a Hugging Face model directory)")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise DataError(f"data.tokenizer: cannot load {directory / 'tokenizer.json'}: {e}") from None
        self._tok.encode_special_tokens = True
        config = (
            _read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() else {}
        )
        self.chat_template = _chat_template(directory, config)
        self.special_tokens = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self._names = {k: _token_name(config.get(f"{k}_token")) for k in ("bos", "eos", "pad", "unk")}

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def _id(self, kind: str) -> int | None:
        name = self._names[kind]
        return None if name is None else self._tok.token_to_id(name)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        for candidate in (self._id("pad"), self._id("eos"), self._id("unk")):
            if candidate is not None:
                return candidate
        return 0

    @property
    def eos_id(self) -> int:
        eos = self._id("eos")
        if eos is None:
            raise DataError(f"data.tokenizer: {self.path} names no eos_token in tokenizer_config.json")
        return eos

    @property
    def bos_id(self) -> int | None:
        return self._id("bos")

    @property
    def bos_token(self) -> str | None:
        return self._names["bos"]

    @property
    def eos_token(self) -> str | None:
        return self._names["eos"]

    def encode(self, text: str) -> list[int]:
        primed = self.__dict__.get("_primed")
        if primed and text in primed:
            return primed[text]
        return self._tok.encode(text, add_special_tokens=False).ids

    def prime(self, texts: Sequence[str]) -> None:
        """Encodes `texts` in one call on the library's threads, for the `encode` calls that
        follow (the same ids); `prime([])` forgets them. Not when the tokenizer pads batches."""
        if not texts or self._tok.padding is not None:
            self._primed = {}
            return
        # _fast (tokenizers >= 0.21): no character offsets, which encode() does not return
        # either; ~10% less time
        encode_batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encodings = encode_batch(list(texts), add_special_tokens=False)
        self._primed = {t: e.ids for t, e in zip(texts, encodings)}

    def encode_offsets(self, text: str, specials: bool) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets; `specials`: special tokens in the text become their ids
        (for rendered templates, whose every special token the template wrote)."""
        tok = self._tok
        if specials:
            if getattr(self, "_tok_specials", None) is None:
                import tokenizers

                self._tok_specials = tokenizers.Tokenizer.from_str(self._tok.to_str())
                self._tok_specials.encode_special_tokens = False
            tok = self._tok_specials
        encoding = tok.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def piece_id(self, piece: str) -> int:
        i = self._tok.token_to_id(piece)
        if i is None:
            raise KeyError(f"tokenizer {self.path} has no piece {piece!r}")
        return i

    def piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i)) or ""

    def is_control(self, i: int) -> bool:
        return self._tok.id_to_token(i) in self.special_tokens

    def save(self, run_dir: str | Path) -> Path:
        """Copies the tokenizer files into `run_dir/tokenizer/`; returns that directory."""
        out = Path(run_dir) / "tokenizer"
        out.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            if (Path(self.path) / name).is_file():
                shutil.copyfile(Path(self.path) / name, out / name)
        return out
