"""Greedy answers to the eval prompts, batched, with the KV-cache sampler.

Contract:
    answer(model, template, prompts, context, sampling, batch_size) -> list[Answer | None]
        None where the rendered prompt has `context` tokens or more (counted, not generated).

Prompts are rendered with the template's `render_prompt` (the conversation, then the
assistant header) and decoding stops at the template's end of turn or the tokenizer's
EOS, as `jaxsft generate` does. Prompts are generated in order of length so a batch
pads little; a short last batch is filled with copies of its last prompt, so every batch
of a length bucket reuses one compilation. Greedy decoding over a fixed order makes the
answers the same on a re-run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jaxsft.data.formats import Conversation
from jaxsft.infer.sampler import Sampling, generate


@dataclasses.dataclass
class Answer:
    text: str
    prompt_tokens: int
    new_tokens: int
    stopped: bool  # ended at a stop id, not at max_new_tokens


def stop_ids(template, tokenizer) -> list[int]:
    return sorted({i for i in (template.end_of_turn_id(tokenizer), tokenizer.eos_id) if i is not None})


def answer(
    model, template, prompts: Sequence[Conversation], context: int, sampling: Sampling, batch_size: int
) -> list[Answer | None]:
    tokenizer = model.tokenizer
    ids = [[int(t) for t in template.render_prompt(p, tokenizer)] for p in prompts]
    todo = sorted((len(p), k) for k, p in enumerate(ids) if len(p) < context)
    stops = stop_ids(template, tokenizer)
    out: list[Answer | None] = [None] * len(prompts)
    for start in range(0, len(todo), batch_size):
        rows = [k for _, k in todo[start : start + batch_size]]
        batch = [ids[k] for k in rows]
        batch += [batch[-1]] * (batch_size - len(batch))
        for k, new in zip(rows, generate(model.graphdef, model.params, batch, stops, sampling)):
            stopped = len(new) < sampling.max_new_tokens
            out[k] = Answer(tokenizer.decode(new), len(ids[k]), len(new), stopped)
    return out
