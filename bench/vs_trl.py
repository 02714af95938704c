"""The whole SFT job, jaxsft against TRL's `SFTTrainer`, side by side on this machine.

    python bench/vs_trl.py [--rounds 2] [--warmup 2] [--steps 6] [--trl-packing bfd] [--smoke]

Bench-only dependency: TRL (`pip install trl`, 1.16 measured; it brings `datasets`). It is
not a dependency of jaxsft; the test of this script skips where it is missing.

Both sides get the same job: the same 2,000 synthetic conversations (`conversations`:
chat_mix's length law from bench/data_throughput.py, lognormal prompt and answer lengths,
median ~33 and ~90 words, but over a Zipf-distributed lexicon of 6,000 pseudo-words so the
tokenizer splits words as on real text, 1-3 exchanges, a system prompt in some), the same
byte-level BPE tokenizer trained here (saved as tokenizer.json + tokenizer_config.json
with a ChatML chat template whose assistant turns sit in `{% generation %}` blocks, so TRL's
`assistant_only_loss` trains content + `<|im_end|>`, as jaxsft does), the same Llama (model
S of bench/common.py: d 256, 4 layers, vocab 8192, init normal(0.02), untied head), rows
of 512 tokens, 8 rows a step, float32, AdamW with warm-up + cosine to 10% and clipping at 1.

- jaxsft: `data.tokenizer: hf:DIR`, `data.template: chatml` (built-in; `--jaxsft-template
  hf` renders the tokenizer's Jinja instead), `data.packing: best_fit`,
  `data.overlong: truncate_at_length` (TRL's cut: the first 512 tokens of an overlong
  conversation; `--jaxsft-overlong truncate`, jaxsft's default, cuts after whole answers
  instead); the step of `jaxsft train` (program.build, state.initial_state), fed by the
  Grain stream as the trainer does.
- TRL: `SFTTrainer(packing=True, packing_strategy="bfd", assistant_only_loss=True)` on
  `AutoTokenizer.from_pretrained(DIR)`, `transformers.LlamaForCausalLM` (sdpa),
  `adamw_torch`, no gradient checkpointing, no bf16, CPU. `bfd` turns on padding-free
  batches: the 8 packed rows are one flattened sequence, and sdpa attends over it with a
  block-causal mask built from `position_ids` (no flash-attention varlen kernel on CPU).
  `--trl-packing wrapped` gives [8, 512] rows instead (attention then crosses examples).

Measured per framework (a round builds everything anew; rounds alternate TRL, jaxsft):
  prep s, prep tok/s  tokenize + mask + pack the 2,000 conversations. TRL: its dataset
                      preparation (`_prepare_dataset`: chat template, assistant masks,
                      labels, bfd packing). jaxsft: `build_data` (an encode pass that
                      counts and checks, keeping no tokens) plus one epoch of the packed
                      stream (which encodes again, masks and packs): a run's work per epoch.
                      best_fit packs windows of examples; the window is set to the data's
                      size (`--pack-window`), so the first batch is exactly one epoch packed
                      (jaxsft's own window, 4,096 examples, would encode ~2 epochs of this
                      data before the first batch)
  packing             tokens / (rows x 512) over the packed epoch (TRL's packed dataset)
  trained/s, tokens/s steady state over `--steps` steps after `--warmup` (compile, first
                      allocations): assistant (trained) targets and all non-pad tokens per
                      second of wall time, the data feed included
  trained %           trained share of the prepared tokens, over the whole data: the two
                      masks should agree (both keep the first 512 tokens of an overlong
                      conversation; jaxsft drops an example left with no trained token,
                      TRL keeps it)
Ratios are jaxsft's speed over TRL's (for prep s: TRL's seconds over jaxsft's). The prep
target is on seconds: both prepare the same 2,000 conversations, but may keep different
token counts (`wrapped` keeps overlong ones whole; `--jaxsft-overlong truncate` cuts after
whole answers), so prep tok/s ratios can mix speed with truncation policy.
Torch threads = os.cpu_count(); XLA uses every core by default.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from jaxsft import hostmem

if __name__ == "__main__":  # run as a script (not imported by a test): the malloc `jaxsft train` runs with
    hostmem.reexec_with_tunables()  # jaxsft/hostmem.py

import numpy as np
from common import size_config

from jaxsft.config import Config, DataConfig, ModelConfig, OptimConfig, SourceConfig, TrainConfig

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else %}{{ message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
SMOKE_MODEL = ModelConfig(d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=32, d_ff=128)


def _lexicon(rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` distinct pseudo-words of 1-4 syllables (a realistic BPE has to split them)."""
    onsets = np.array(list("bcdfghjklmnprstvwz") + ["ch", "sh", "th", "st", "tr", "pl", "gr", "br"])
    vowels = np.array(list("aeiou") + ["ai", "ea", "ou", "io"])
    codas = np.array(["", "", "", "n", "r", "s", "t", "l", "nd", "st", "ng"])
    words: set[str] = set()
    while len(words) < n:
        k = int(rng.integers(1, 5))
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(k)))
    return np.array(sorted(words))


def _text(rng: np.random.Generator, lexicon: np.ndarray, p: np.ndarray, n_words: int) -> str:
    """`n_words` Zipf-drawn words as sentences: capitals, commas, full stops, some numbers."""
    words = list(rng.choice(lexicon, n_words, p=p))
    out, start = [], True
    for w in words:
        if rng.random() < 0.03:
            w = str(int(rng.integers(0, 2000)))
        out.append(w.capitalize() if start else w)
        start = rng.random() < 0.08
        if start:
            out[-1] += "." if rng.random() < 0.8 else "?"
        elif rng.random() < 0.06:
            out[-1] += ","
    return " ".join(out) + ("" if start else ".")


def conversations(n: int, seed: int = 0) -> list[dict]:
    """`messages` records: chat_mix's lognormal lengths (prompt ~33, answer ~90 words median)
    over a Zipf lexicon; 1-3 exchanges (60/30/10%), a short system prompt in 20%."""
    rng = np.random.default_rng(seed)
    lexicon = rng.permutation(_lexicon(rng, 6000))
    p = 1.0 / np.arange(1, len(lexicon) + 1) ** 1.1
    p /= p.sum()
    records = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.2:
            messages.append({"role": "system", "content": _text(rng, lexicon, p, int(rng.integers(5, 25)))})
        for _ in range(int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))):
            for role, mu in (("user", 3.5), ("assistant", 4.5)):
                n_words = max(1, int(rng.lognormal(mu, 0.9)))
                messages.append({"role": role, "content": _text(rng, lexicon, p, n_words)})
        records.append({"messages": messages})
    return records


def train_tokenizer(records: list[dict], directory: Path, vocab_size: int) -> Path:
    """A byte-level BPE on the records' texts, saved as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = (m["role"] + "\n" + m["content"] for r in records for m in r["messages"])
    tok.train_from_iterator(texts, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": None,
        "model_max_length": 1 << 20,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)  # where transformers 5 reads it
    return directory


def bench_config(args, records_path: str, tok_dir: Path) -> tuple[Config, int]:
    """(config, vocab): model S (or the smoke model), 8 rows, float32 AdamW, warm-up + cosine."""
    cfg, vocab = size_config("S")
    if args.smoke:
        vocab = 1024
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(SMOKE_MODEL, vocab_size=vocab, attention="xla"))
    data = DataConfig(
        sources=(SourceConfig(path=records_path),),
        tokenizer=f"hf:{tok_dir}",
        template=args.jaxsft_template,
        max_length=args.length,
        packing=args.jaxsft_packing,
        overlong=args.jaxsft_overlong,
        max_dropped_fraction=0.5,  # overlong prompts leave no trained token: jaxsft drops them (counted)
        # One packing stream: best_fit packs windows of 4,096 examples per virtual shard, so the
        # default 8 shards would encode 8 windows (16 passes over 2,000 conversations) up front.
        virtual_shards=1,
    )
    steps = args.warmup + args.steps
    optim = OptimConfig(warmup_steps=args.warmup)
    train = TrainConfig(steps=steps, global_batch_size=cfg.train.global_batch_size)
    return dataclasses.replace(cfg, data=data, optim=optim, train=train), vocab


def jaxsft_round(cfg: Config, vocab: int, args, cache: Path) -> dict:
    import jax

    from jaxsft.data import pipeline
    from jaxsft.train import program as program_lib
    from jaxsft.train import sharding
    from jaxsft.train import state as state_lib

    rows = cfg.train.global_batch_size
    start = time.perf_counter()
    data = pipeline.build_data(cfg.data, seed=cfg.train.seed, cache_dir=cache)
    build_s = time.perf_counter() - start
    examples, seen, real, cells = data.report.examples, 0, 0, 0
    pipeline.PACK_WINDOW = args.pack_window or examples  # best_fit: the first batch packs one epoch
    iterator = iter(data.train_dataset(rows, seed=cfg.train.seed))
    prep_s = None
    while seen < examples:  # one epoch: until the batches hold as many examples as the data
        batch = next(iterator)
        if prep_s is None and cfg.data.packing == "best_fit" and not args.pack_window:
            prep_s = time.perf_counter() - start  # the window (one epoch) is encoded and packed
        seen += int(batch["segment_ids"].max(axis=1).sum())
        real += int(np.count_nonzero(batch["segment_ids"]))
        cells += batch["segment_ids"].size
    prep_s = prep_s or time.perf_counter() - start

    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    program = program_lib.build(cfg, vocab, mesh)
    state, frozen = state_lib.initial_state(cfg, vocab, program.optimizer, program.plan)
    start = time.perf_counter()
    step = program.compile_train()
    compile_s = time.perf_counter() - start
    tokens = trained = 0
    warmup, steps = args.warmup, args.steps
    for i in range(warmup + steps):
        if i == warmup:
            jax.block_until_ready(state)
            start = time.perf_counter()
        batch = next(iterator)
        if i >= warmup:
            tokens += int(np.count_nonzero(batch["segment_ids"]))
            trained += int(np.count_nonzero(batch["loss_weights"]))
        state, metrics = step(state, sharding.global_batch(batch, program.batch_sharding), *frozen)
        if i == 0:
            first_loss = float(metrics["loss"])  # a warm-up step: the host sync costs no timed step
    loss = float(metrics["loss"])  # blocks on the last step
    seconds = time.perf_counter() - start
    iterator.close()
    return {
        "prep_s": prep_s,
        "build_s": build_s,
        "prep_tokens": data.report.tokens,
        "packing": real / cells,
        "dropped": data.report.lost,
        "compile_s": compile_s,
        "tokens_s": tokens / seconds,
        "trained_s": trained / seconds,
        "trained_share": data.report.trained_tokens / data.report.tokens,
        "loss": (first_loss, loss),
    }


def hf_llama(cfg: Config, vocab: int):
    """`transformers.LlamaForCausalLM` of the same shapes and init scheme, float32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    hf_cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=m.d_model,
        intermediate_size=m.d_ff,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads,
        head_dim=m.head_dim,
        rms_norm_eps=m.norm_eps,
        max_position_embeddings=cfg.data.max_length,
        tie_word_embeddings=False,
        initializer_range=m.init_std,
        attn_implementation="sdpa",
    )
    torch.manual_seed(cfg.train.seed)
    return LlamaForCausalLM(hf_cfg).float()


def _trl_trainer_class():
    """SFTTrainer that times its dataset preparation and counts the tokens of every step."""
    import trl

    class Measured(trl.SFTTrainer):
        def __init__(self, *args, **kwargs):
            self.prep_s, self.counts, self.losses = 0.0, [], []
            super().__init__(*args, **kwargs)

        def _prepare_dataset(self, *args, **kwargs):
            start = time.perf_counter()
            out = super()._prepare_dataset(*args, **kwargs)
            self.prep_s += time.perf_counter() - start
            return out

        def compute_loss(self, model, inputs, *args, **kwargs):
            labels, mask = inputs["labels"], inputs.get("attention_mask")
            tokens = int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            self.counts.append((tokens, int((labels[:, 1:] != -100).sum())))  # the model shifts labels
            out = super().compute_loss(model, inputs, *args, **kwargs)
            self.losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))  # CPU: no sync cost
            return out

    return Measured


def trl_round(cfg: Config, vocab: int, records: list[dict], tok_dir: Path, args, out_dir: Path) -> dict:
    import datasets
    import transformers
    import trl

    clock = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *_, **__):
            clock.append(time.perf_counter())

    o, rows = cfg.optim, cfg.train.global_batch_size
    sft = trl.SFTConfig(
        output_dir=str(out_dir),
        max_length=cfg.data.max_length,
        packing=True,
        packing_strategy=args.trl_packing,
        assistant_only_loss=True,
        per_device_train_batch_size=rows,
        max_steps=cfg.train.steps,
        learning_rate=o.learning_rate,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": o.end_learning_rate_ratio},
        warmup_steps=o.warmup_steps,
        weight_decay=o.weight_decay,
        adam_beta1=o.b1,
        adam_beta2=o.b2,
        adam_epsilon=o.eps,
        max_grad_norm=o.clip_norm,
        optim="adamw_torch",
        bf16=False,
        fp16=False,
        use_cpu=True,
        activation_checkpointing=False,  # SFTConfig's default is on; jaxsft's model.remat is none
        logging_steps=cfg.train.steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=cfg.train.seed,
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    trainer = _trl_trainer_class()(
        model=hf_llama(cfg, vocab),
        args=sft,
        train_dataset=datasets.Dataset.from_list(records),
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.remove_callback(transformers.PrinterCallback)  # its log dicts would interleave with the table
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    labelled = sum(sum(t != -100 for t in labels) for labels in trainer.train_dataset["labels"])
    trainer.train()
    w = args.warmup
    seconds = clock[-1] - clock[w - 1] if w else clock[-1] - clock[0]
    measured = trainer.counts[w:] if w else trainer.counts[1:]
    tokens, trained = (sum(c[k] for c in measured) for k in (0, 1))
    return {
        "prep_s": trainer.prep_s,
        "prep_tokens": sum(lengths),
        "packing": sum(lengths) / (len(lengths) * cfg.data.max_length),
        "tokens_s": tokens / seconds,
        "trained_s": trained / seconds,
        "trained_share": labelled / sum(lengths),
        "loss": (trainer.losses[0], trainer.losses[-1]),
    }


def _median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def print_table(results: dict[str, list[dict]]) -> None:
    keys = ("prep_s", "prep_tokens", "packing", "trained_s", "tokens_s", "trained_share")
    med = {name: {k: _median(rs, k) for k in keys} for name, rs in results.items()}
    for m in med.values():
        m["prep_tok_s"] = m["prep_tokens"] / m["prep_s"]
    print(
        f"{'framework':<10} {'prep s':>7} {'prep tok/s':>11} {'packing':>8} {'trained/s':>10} "
        f"{'tokens/s':>9} {'trained %':>9}"
    )
    for name, m in med.items():
        print(
            f"{name:<10} {m['prep_s']:7.2f} {m['prep_tok_s']:11,.0f} {m['packing']:8.4f} {m['trained_s']:10,.0f} "
            f"{m['tokens_s']:9,.0f} {m['trained_share']:9.1%}"
        )
    jx, trl = med["jaxsft"], med["TRL"]
    print(
        f"{'ratio':<10} {trl['prep_s'] / jx['prep_s']:6.2f}x {jx['prep_tok_s'] / trl['prep_tok_s']:10.2f}x "
        f"{jx['packing'] / trl['packing']:7.3f}x {jx['trained_s'] / trl['trained_s']:9.2f}x "
        f"{jx['tokens_s'] / trl['tokens_s']:8.2f}x"
    )
    print(
        "targets: trained/s >= 2.50x, prep speed (TRL s / jaxsft s) >= 3.00x, packing >= 1.000x  "
        f"(reached: {jx['trained_s'] / trl['trained_s']:.2f}x, {trl['prep_s'] / jx['prep_s']:.2f}x, "
        f"{jx['packing'] / trl['packing']:.3f}x)"
    )


def _quiet() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="each builds and runs both frameworks, TRL first")
    parser.add_argument("--warmup", type=int, default=2, help="steps before the clock starts (compile, allocation)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--conversations", type=int, default=2000)
    parser.add_argument("--length", type=int, default=512, help="tokens per packed row")
    parser.add_argument("--trl-packing", default="bfd", choices=("bfd", "bfd_split", "wrapped"))
    parser.add_argument("--jaxsft-packing", default="best_fit", choices=("best_fit", "first_fit"))
    parser.add_argument(
        "--jaxsft-overlong",
        default="truncate_at_length",
        choices=("truncate_at_length", "truncate"),
        help="data.overlong; truncate_at_length cuts where TRL does",
    )
    parser.add_argument(
        "--pack-window",
        type=int,
        default=0,
        help="best_fit's window in examples; 0: the data's size, one epoch (jaxsft's own is 4096, ~2 epochs here)",
    )
    parser.add_argument("--jaxsft-template", default="chatml", choices=("chatml", "hf"))
    parser.add_argument("--smoke", action="store_true", help="50 conversations, a tiny model, rows of 256, 1+2 steps")
    args = parser.parse_args()
    if importlib.util.find_spec("trl") is None:
        raise SystemExit("bench/vs_trl.py needs TRL, a bench-only dependency: pip install trl")
    if args.smoke:
        args.conversations, args.length, args.rounds, args.warmup, args.steps = 50, 256, 1, 1, 2
    import torch

    torch.set_num_threads(os.cpu_count())
    _quiet()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        records = conversations(args.conversations)
        records_path = tmp / "chats.jsonl"
        records_path.write_text("".join(json.dumps(r) + "\n" for r in records))
        cfg, vocab = bench_config(args, str(records_path), tmp / "tokenizer")
        train_tokenizer(records, tmp / "tokenizer", vocab)
        print(
            f"{os.cpu_count()} CPU cores; torch threads {torch.get_num_threads()}; load average "
            f"{os.getloadavg()[0]:.1f}; {len(records)} conversations; vocab {vocab}; "
            f"{cfg.train.global_batch_size} x {args.length}; d_model {cfg.model.d_model}, {cfg.model.n_layers} layers; "
            f"TRL packing {args.trl_packing}, jaxsft packing {args.jaxsft_packing}, overlong {args.jaxsft_overlong} "
            f"(window {args.pack_window or 'one epoch'}, template {args.jaxsft_template}); "
            f"{args.rounds} rounds of {args.warmup} + {args.steps} steps; medians"
        )
        results: dict[str, list[dict]] = {"TRL": [], "jaxsft": []}
        for r in range(args.rounds):
            results["TRL"].append(trl_round(cfg, vocab, records, tmp / "tokenizer", args, tmp / f"trl{r}"))
            results["jaxsft"].append(jaxsft_round(cfg, vocab, args, tmp / "cache"))
            for name, rs in results.items():
                x = rs[-1]
                print(
                    f"round {r + 1} {name:<6} prep {x['prep_s']:6.2f} s  packing {x['packing']:.4f}  "
                    f"{x['trained_s']:8,.0f} trained/s  {x['tokens_s']:8,.0f} tokens/s  loss {x['loss'][0]:.3f} -> {x['loss'][1]:.3f}"
                    + (
                        f"  (build_data {x['build_s']:.2f} s, {x['dropped']} dropped, compile {x['compile_s']:.1f} s)"
                        if "build_s" in x
                        else ""
                    ),
                    flush=True,
                )
        print_table(results)


if __name__ == "__main__":
    main()
