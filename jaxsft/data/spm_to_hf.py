"""A jaxsft SentencePiece model as a Hugging Face `tokenizer.json`, for exports.

The trainer's models (tokenizer.py) are BPE with identity normalisation, no dummy prefix and
byte fallback, and SentencePiece's BPE merges, over the whole text, the adjacent pair whose
concatenation is the highest-scoring piece. The same tokenizer in `tokenizers` terms:
spaces replaced by `▁`, no pre-tokenizer, a BPE whose merges are every split of every piece
ranked by that piece's score, byte fallback; control pieces (and `<unk>`) as special tokens.
`tests/infer/test_export_chat.py` checks the ids equal SentencePiece's.
"""

from __future__ import annotations

from pathlib import Path


def spm_to_tokenizer_json(model_path: str | Path) -> str:
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    n = sp.vocab_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    ranked = sorted(
        (i for i in range(n) if i not in special and not sp.is_byte(i)), key=lambda i: (-sp.get_score(i), i)
    )
    merges = []
    for i in ranked:
        piece = sp.id_to_piece(i)
        merges += [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
    unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in special])
    return tok.to_str()
