"""The held-out evaluation the trainer runs at step 0 and at every `train.eval_every`.

Contract:
    held_out = HeldOut(cfg, data, vocab_size, frozen, run_dir, start, loss)
    held_out(step, params) -> {"step", "eval_loss", "eval_<metric>", "eval_<metric>/task/<task>", ...}
        `loss(params)` is the trainer's held-out loss; the rest is the generation eval of
        `jaxsft eval` (generation.py, metrics.py) on the in-memory params, never a reload.
    prompts(splits, n, regex) -> the fixed prompts: n records spread evenly over the eval splits

The same `eval.generate_n` records are answered at every eval (greedy, `eval.max_new_tokens`),
so their scores are comparable from step to step. Each eval appends its answers to
`RUN/samples.jsonl`, one line per prompt with its `step` (the `jaxsft eval` sample fields);
a resumed run first forgets the lines of steps after its checkpoint, as metrics.jsonl does.

Score keys (all rates in [0, 1], only metrics that apply): `eval_exact_match` over every
prompt, `eval_exact_match/task/<task>` per `task` field, and `eval_exact_match/source/<name>`
per source when there is more than one. A PEFT run's trainable part is merged into its
frozen base first (peft.merged), as `jaxsft generate` does for the saved run; adapters,
prefixes and prompts, which do not merge, run beside the base (model/adapted.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxsft.config import Config, PeftConfig
from jaxsft.data.reading import Split
from jaxsft.eval import generation, metrics, records
from jaxsft.eval.samples import generation_report, sample_of
from jaxsft.infer.runs import Loaded
from jaxsft.infer.sampler import Sampling
from jaxsft.model import adapted, peft
from jaxsft.model.transformer import abstract_model
from jaxsft.train import distributed
from jaxsft.train.metrics import console, drop_after

SAMPLES_FILE = "samples.jsonl"


def prompts(splits: Sequence[Split], n: int, regex: str = "") -> list[records.Item]:
    """Up to n records with a reference, spread evenly over each split (n shared out between splits)."""
    splits = [s for s in splits if len(s.ids)]
    chosen = []
    for k, split in enumerate(splits):
        share = min(len(split.ids), n // len(splits) + (k < n % len(splits)))
        if share:
            where = np.unique(np.linspace(0, len(split.ids) - 1, share).round().astype(int))
            chosen.append(dataclasses.replace(split, ids=split.ids[where]))
    items, _ = records.read_items(chosen, regex)
    return [item for item in items if item.reference is not None]


def _tag(name: str) -> str:
    """A group name as TensorBoard keeps it (its tag characters), so both logs use one key."""
    return re.sub(r"[^-\w.]", "_", name) or "_"


def flat_scores(report: dict) -> dict[str, float]:
    """`generation_report` as flat metric keys; per-source keys only when there are several sources."""
    groups = [("", report["overall"])]
    if len(report["by_source"]) > 1:
        groups += [(f"/source/{_tag(name)}", tally) for name, tally in report["by_source"].items()]
    groups += [(f"/task/{_tag(name)}", tally) for name, tally in report["by_task"].items()]
    return {
        f"eval_{metric}{suffix}": tally[metric]["rate"]
        for suffix, tally in groups
        for metric in metrics.METRICS
        if tally[metric]["rate"] is not None
    }


class HeldOut:
    def __init__(
        self, cfg: Config, data, vocab_size: int, frozen: tuple, run_dir: Path, start: int, loss: Callable[[Any], float]
    ):
        self.loss, self.frozen, self.cfg = loss, frozen, cfg
        self.samples_path = Path(run_dir) / SAMPLES_FILE
        self.items: list[records.Item] = []
        if cfg.eval.generate_n and jax.process_count() > 1:
            console.print(
                "eval.generate_n: the generation eval during training runs on one process only; "
                "skipped (score the run with `jaxsft eval`)"
            )
        elif cfg.eval.generate_n:
            self.items = prompts(data.evals, cfg.eval.generate_n, cfg.eval.regex)
        # The sampler's model: the whole model, without the PEFT split (its params are merged below).
        self.model_cfg = dataclasses.replace(cfg.model, init_from="", peft=PeftConfig())
        self.graphdef = nnx.graphdef(abstract_model(self.model_cfg, vocab_size))
        self.vocab_size, self.tokenizer, self.template = vocab_size, data.tokenizer, data.template
        if distributed.is_main():
            drop_after(self.samples_path, start)

    def __call__(self, step: int, params) -> dict:
        record = {"step": step, "eval_loss": self.loss(params)}
        if not self.items:
            return record
        samples = self.answer(params)
        if distributed.is_main():
            with open(self.samples_path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps({"step": step, **s}, ensure_ascii=False) + "\n" for s in samples)
        return {**record, **flat_scores(generation_report(samples))}

    def answer(self, params) -> list[dict]:
        """The fixed prompts' samples (`jaxsft eval`'s fields) under these params."""
        graphdef, method = self.graphdef, self.cfg.model.peft
        if self.frozen and not peft.mergeable(method):  # adapters, prefixes, prompts: base + trained part
            graphdef, params = adapted.build(self.model_cfg, self.vocab_size, method, self.frozen[0], params)
        elif self.frozen:
            params = peft.merged(method, params, self.frozen[0], dtype=self.model_cfg.param_dtype)
        model = Loaded(graphdef, params, self.model_cfg, self.vocab_size, self.tokenizer, self.cfg.data.template)
        sampling = Sampling(max_new_tokens=self.cfg.eval.max_new_tokens)
        answers = generation.answer(
            model,
            self.template,
            [it.prompt for it in self.items],
            self.cfg.data.max_length,
            sampling,
            self.cfg.eval.batch_size,
        )
        return [sample_of(item, a) for item, a in zip(self.items, answers)]


def logged_scores(metrics_path: Path) -> list[dict]:
    """The generation scores of every eval in a run's metrics file, in order, each with its step."""
    if not Path(metrics_path).exists():
        return []
    out = []
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        scores = {k: v for k, v in record.items() if k.startswith("eval_") and k != "eval_loss"}
        if scores:
            out.append({"step": record["step"], **scores})
    return out
