"""What makes an exported model directory chat in transformers as is (DESIGN.md invariant 12).

Contract:
    write_chat_files(out_dir, tokenizer, template_name, base_dir=None) -> written file names
        - tokenizer.json: the run's own (Hugging Face runs), or its SentencePiece model converted
          (spm_to_hf.py; tokenizer.model stays beside it);
        - the chat template the run trained with (the tokenizer's own for `hf`, else the built-in
          template's Jinja twin) in both layouts: chat_template.jinja (transformers >= 4.43, 5.x) and
          `chat_template` in tokenizer_config.json (4.5x reads either);
        - eos/bos/pad ids in config.json and generation_config.json, eos = the template's
          end-of-turn id(s) then the tokenizer's EOS, so `generate` stops at the end of the
          answer. A base model's generation_config.json (`base_dir`) keeps its other settings.
"""

from __future__ import annotations

import json
from pathlib import Path

GENERATION_CONFIG = "generation_config.json"


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def chat_template_text(tokenizer, template_name: str) -> str:
    from jaxsft.data.templates import BUILTIN

    if template_name == "hf":
        return tokenizer.chat_template
    return BUILTIN[template_name].jinja


def end_of_turn_ids(tokenizer, template_name: str) -> list[int]:
    from jaxsft.data.templates import get_template

    template = get_template(template_name, tokenizer)
    eots = [tokenizer.piece_id(t) for t in getattr(template, "eots", ())] or [template.end_of_turn_id(tokenizer)]
    return list(dict.fromkeys(eots + [tokenizer.eos_id]))


def special_ids(tokenizer, template_name: str) -> dict:
    eos = end_of_turn_ids(tokenizer, template_name)
    out = {"eos_token_id": eos if len(eos) > 1 else eos[0], "pad_token_id": tokenizer.pad_id}
    if tokenizer.bos_id is not None:
        out["bos_token_id"] = tokenizer.bos_id
    return out


def _ids(value) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def _tokenizer_config(out_dir: Path, tokenizer, template: str) -> dict:
    config = _read(out_dir / "tokenizer_config.json")
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    for kind in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{kind}_id")
        if f"{kind}_token" not in config and token_id is not None:
            config[f"{kind}_token"] = tokenizer.piece(token_id)
    config["chat_template"] = template
    return config


def write_chat_files(
    out_dir: str | Path, tokenizer, template_name: str, base_dir: str | Path | None = None
) -> list[str]:
    out_dir = Path(out_dir)
    written = []
    if not (out_dir / "tokenizer.json").is_file():  # a SentencePiece run
        from jaxsft.data.spm_to_hf import spm_to_tokenizer_json

        (out_dir / "tokenizer.json").write_text(spm_to_tokenizer_json(tokenizer.path), encoding="utf-8")
        written.append("tokenizer.json")
    template = chat_template_text(tokenizer, template_name)
    (out_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    _write(out_dir / "tokenizer_config.json", _tokenizer_config(out_dir, tokenizer, template))
    ids = special_ids(tokenizer, template_name)
    _write(out_dir / "config.json", {**_read(out_dir / "config.json"), **ids})
    base = _read(Path(base_dir) / GENERATION_CONFIG) if base_dir else {}
    base_eos = base.get("eos_token_id")
    eos = list(dict.fromkeys(_ids(ids["eos_token_id"]) + _ids(base_eos)))  # the base's stop ids stay stop ids
    ids_out = {**ids, "eos_token_id": eos if len(eos) > 1 else eos[0]}
    _write(out_dir / GENERATION_CONFIG, {**base, **ids_out, "_from_model_config": False})
    return written + ["chat_template.jinja", "tokenizer_config.json", GENERATION_CONFIG]
