"""Tokenizer directories for the official chat templates in tests/data/templates/.

Two small tokenizers trained offline stand for the real ones: a byte-level BPE with the
Llama 3 / Qwen pre-tokenizer regex (Llama 3, Qwen, DeepSeek, gpt-oss, Granite, SmolLM3,
Mistral-Nemo's tekken) and a SentencePiece-like Metaspace BPE (Mistral 7B, Phi-3.5, Gemma).
Each family gets its own special tokens (and Qwen's non-special added tokens), so special
tokens and merges across message edges behave as with the real vocabularies.
"""

import json
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"
SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3 = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
]
QWEN = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_ADDED = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
DEEPSEEK = [
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
]
MISTRAL = [
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[CALL_ID]",
    "[ARGS]",
]
GPT_OSS = [
    "<|startoftext|>",
    "<|endoftext|>",
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|channel|>",
    "<|return|>",
    "<|call|>",
    "<|constrain|>",
]

# name: (template file, tokenizer kind, bos, eos, special tokens, added non-special tokens, reasoning style)
FAMILIES = {
    "llama3.1": ("meta-llama-Llama-3.1-8B-Instruct", "byte", "<|begin_of_text|>", "<|eot_id|>", LLAMA3, [], "none"),
    "llama3.2": ("meta-llama-Llama-3.2-3B-Instruct", "byte", "<|begin_of_text|>", "<|eot_id|>", LLAMA3, [], "none"),
    "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct", "byte", None, "<|im_end|>", QWEN, QWEN_ADDED, "none"),
    "qwen3": ("Qwen-Qwen3-0.6B", "byte", None, "<|im_end|>", QWEN, QWEN_ADDED, "field"),
    "qwq": ("Qwen-QwQ-32B", "byte", None, "<|im_end|>", QWEN, QWEN_ADDED, "content"),
    "r1-qwen": (
        "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
        "byte",
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        DEEPSEEK,
        ["<think>", "</think>"],
        "none",
    ),
    "r1-llama": (
        "deepseek-ai-DeepSeek-R1-Distill-Llama-8B",
        "byte",
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        DEEPSEEK,
        ["<think>", "</think>"],
        "none",
    ),
    "gemma2": (
        "google-gemma-2-2b-it",
        "meta",
        "<bos>",
        "<eos>",
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        [],
        "none",
    ),
    "gemma3": (
        "google-gemma-3-4b-it",
        "meta",
        "<bos>",
        "<eos>",
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        [],
        "none",
    ),
    "phi3.5": (
        "microsoft-Phi-3.5-mini-instruct",
        "meta",
        "<s>",
        "<|endoftext|>",
        ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        [],
        "none",
    ),
    "phi4": (
        "microsoft-phi-4",
        "byte",
        "<|endoftext|>",
        "<|im_end|>",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>"],
        [],
        "none",
    ),
    "mistral-v0.2": ("mistralai-Mistral-7B-Instruct-v0.2", "meta", "<s>", "</s>", ["<unk>", "<s>", "</s>"], [], "none"),
    "mistral-v0.3": ("mistralai-Mistral-7B-Instruct-v0.3", "meta", "<s>", "</s>", MISTRAL, [], "none"),
    "mistral-nemo": ("mistralai-Mistral-Nemo-Instruct-2407", "byte", "<s>", "</s>", MISTRAL, [], "none"),
    "mistral-small": ("Mistral-Small-3.2-24B-Instruct-2506", "byte", "<s>", "</s>", MISTRAL, [], "none"),
    "gpt-oss": ("openai-gpt-oss-120b", "byte", "<|startoftext|>", "<|return|>", GPT_OSS, [], "field"),
    "granite": (
        "ibm-granite-granite-3.3-2B-Instruct",
        "byte",
        "<|end_of_text|>",
        "<|end_of_text|>",
        ["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>"],
        [],
        "content",
    ),
    "smollm3": (
        "HuggingFaceTB-SmolLM3-3B",
        "byte",
        None,
        "<|im_end|>",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        ["<think>", "</think>"],
        "content",
    ),
}


def template_source(family: str) -> str:
    return (TEMPLATES / f"{FAMILIES[family][0]}.jinja").read_text(encoding="utf-8")


def train_base(kind: str, texts: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "byte":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted(set("".join(texts)))
    trainer = trainers.BpeTrainer(
        vocab_size=900,
        special_tokens=["<unk>"] if kind == "meta" else [],
        show_progress=False,
        initial_alphabet=alphabet,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def family_dir(base, family: str, root: Path) -> Path:
    """A Hugging Face tokenizer directory: the base vocabulary plus the family's tokens and template."""
    from tokenizers import AddedToken, Tokenizer

    _, _, bos, eos, specials, added, _ = FAMILIES[family]
    tok = Tokenizer.from_str(base.to_str())
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if added:
        tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in added])
    directory = root / family
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "chat_template": template_source(family),
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory
