"""What the model will see: `preview` renders examples with their trained tokens marked,
`stats` counts every source and measures packing. Both return text (the CLI prints it).

Preview marks trained tokens with ANSI green in a terminal (`color=True`) and with
`[[...]]` otherwise; special tokens are shown by name (`<|im_end|>`); then each turn's trained
tokens on a line of their own (any template, `hf` included). Stats packs real batches of the configured train
graph to measure packing efficiency (non-pad tokens / all tokens) and examples per
row, and from those estimates each source's epochs at `train.steps`.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from jaxsft import cache
from jaxsft.config import Config
from jaxsft.data.model_tokenizer import with_model_tokenizer
from jaxsft.data.pipeline import SFTData, build_data
from jaxsft.data.reading import DataReport

GREEN, RESET = "\x1b[32m", "\x1b[0m"
PACKING_BATCHES = 20


def _pieces(tokenizer, ids: np.ndarray) -> list[str]:
    """Display text per run of ids: control/special tokens by name, text decoded."""
    out, run = [], []
    for i in ids.tolist():
        if tokenizer.is_control(i):
            if run:
                out.append(tokenizer.decode(run))
                run = []
            out.append(tokenizer.piece(i))
        else:
            run.append(i)
    return out + ([tokenizer.decode(run)] if run else [])


def highlight(tokenizer, tokens: np.ndarray, weights: np.ndarray, color: bool) -> str:
    """Tokens as text, trained ones (weight > 0 as *targets*, so from token 1 on) marked."""
    trained = np.concatenate([[False], weights[1:] > 0])
    parts = []
    for on, group in itertools.groupby(range(len(tokens)), key=lambda k: bool(trained[k])):
        idx = list(group)
        text = "".join(_pieces(tokenizer, tokens[idx[0] : idx[-1] + 1]))
        parts.append((f"{GREEN}{text}{RESET}" if color else f"[[{text}]]") if on else text)
    return "".join(parts)


def trained_by_turn(tokenizer, messages, tokens: np.ndarray, weights: np.ndarray, ends: dict[int, int]) -> list[str]:
    """One line per message with trained tokens: its index, role and the trained text (repr)."""
    lines, start = [], 0
    for i in sorted(ends):
        end = max(ends[i], start)
        picked = tokens[start:end][weights[start:end] > 0]
        if len(picked):
            lines.append(f"  messages[{i}] {messages[i].role}: trained {''.join(_pieces(tokenizer, picked))!r}")
        start = end
    return lines


def preview(cfg: Config, n: int = 3, color: bool = False, cache_dir: Path | None = None) -> str:
    """The first `n` train examples of each source as the model sees them."""
    cfg = with_model_tokenizer(cfg)  # as training chooses it
    data = build_data(cfg.data, seed=cfg.train.seed, cache_dir=cache_dir or cache.cache_dir())
    from jaxsft.data.pipeline import Encoder

    encoder = Encoder(cfg.data, data.tokenizer)
    lines = [
        f"template {cfg.data.template}, tokenizer {getattr(data.tokenizer, 'path', '')}, "
        f"loss_on {cfg.data.loss_on}; trained tokens {'in green' if color else 'in [[...]]'}"
    ]
    for split, pool in zip(data.train, data.pools):
        for i in pool[:n]:
            tokens, weights, ends = encoder.render(split.conversation(int(i)))
            out = encoder.encode(split.conversation(int(i)))
            trained = int(np.count_nonzero(weights[1:]))
            note = (
                f", truncated ({out[1]}) to {len(out[0]['inputs']) + 1}" if not isinstance(out, str) and out[1] else ""
            )
            lines.append(
                f"--- {split.name} {split.source.where(int(i))}: {len(tokens)} tokens, {trained} trained{note}"
            )
            lines.append(highlight(data.tokenizer, tokens, weights, color))
            lines += trained_by_turn(data.tokenizer, split.conversation(int(i)), tokens, weights, ends)
    return "\n".join(lines)


def measure_packing(data: SFTData, rows: int, batches: int = PACKING_BATCHES, seed: int = 0) -> tuple[float, float]:
    """(packing efficiency, examples per row) over `batches` train batches."""
    it = iter(data.train_dataset(rows, seed=seed))
    real = total = segments = 0
    try:
        for _ in range(batches):
            b = next(it)
            real += int(np.count_nonzero(b["segment_ids"]))
            total += b["segment_ids"].size
            segments += sum(len(np.unique(r[r > 0])) for r in b["segment_ids"])
    finally:
        it.close()
    return real / total, segments / (batches * rows)


def histogram(lengths: np.ndarray, max_length: int, width: int = 40) -> list[str]:
    edges = (
        [0]
        + [2**k for k in range(3, 30) if 2**k < max_length]
        + [max_length, max(max_length, int(lengths.max(initial=0))) + 1]
    )
    counts, _ = np.histogram(lengths, bins=edges)
    top = max(int(counts.max(initial=0)), 1)
    return [
        f"  {lo:>6}-{hi - 1:<6} {c:>8}  {'#' * round(width * c / top)}"
        for lo, hi, c in zip(edges, edges[1:], counts)
        if c or lo < max_length
    ]


def _source_line(name: str, r: DataReport, epochs: float) -> str:
    reasons = {**r.bad_records, **r.dropped}
    dropped = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or "none"
    trunc = ", ".join(f"{k}: {v}" for k, v in sorted(r.truncations.items())) or "none"
    share = r.trained_tokens / max(r.tokens, 1)
    return (
        f"{name}: {r.records} records, {r.examples} good, dropped {r.lost} ({dropped}), {r.tokens} tokens, "
        f"{100 * share:.1f}% trained, truncated {r.truncated} ({trunc}), {epochs:.2f} epochs at {{steps}} steps"
    )


def expected_epochs(data: SFTData, steps: int, examples_per_step: float) -> list[float]:
    """Per source: expected passes over its examples in `steps` steps, stage by stage."""
    stages = data.stage_probabilities()
    ends = [s for s, _ in stages[1:]] + [steps]
    drawn = np.zeros(len(data.pools))
    for (start, probs), end in zip(stages, ends):
        drawn += probs * max(0, min(end, steps) - start) * examples_per_step
    return [float(d / len(p)) if len(p) else 0.0 for d, p in zip(drawn, data.pools)]


def stats(cfg: Config, cache_dir: Path | None = None) -> str:
    cfg = with_model_tokenizer(cfg)  # as training chooses it
    data = build_data(cfg.data, seed=cfg.train.seed, cache_dir=cache_dir or cache.cache_dir())
    rows = cfg.train.global_batch_size
    efficiency, per_row = measure_packing(data, rows, seed=cfg.train.seed)
    epochs = expected_epochs(data, cfg.train.steps, per_row * rows)
    lines = [
        f"{len(data.train)} source(s), template {cfg.data.template}, max_length {cfg.data.max_length}, "
        f"packing {cfg.data.packing}, weight_by {cfg.data.weight_by}"
    ]
    for (name, r), e in zip(data.source_reports.items(), epochs):
        lines.append(_source_line(name, r, e).format(steps=cfg.train.steps))
        lines += [f"    {b}" for b in r.bad_examples[:3]]
    for start, probs in data.stage_probabilities():
        share = ", ".join(f"{s.name} {100 * p:.1f}%" for s, p in zip(data.train, probs))
        lines.append(f"from step {start}: sampled examples {share}")
    lines.append(f"eval: {data.eval_report.records} records, {data.eval_report.examples} examples")
    lines.append(
        f"packing efficiency {100 * efficiency:.2f}% (non-pad / all tokens over {PACKING_BATCHES} batches "
        f"of {rows} x {cfg.data.max_length}), {per_row:.2f} examples per row"
    )
    lines.append("example length (tokens):")
    lines += histogram(np.concatenate(data.lengths), cfg.data.max_length)
    return "\n".join(lines)
