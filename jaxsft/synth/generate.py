"""`jaxsft synth`: K sampled responses per prompt, filtered and ranked, written as training data.

Contract:
    Settings(source, prompts, out, samples, sampling, steps, batch_size)
    run(settings, progress=True) -> totals {"prompts", "generated", "kept", "dropped": {reason: n}}
        appends to `out` (records.Output) and prints one summary line per reason.

How: prompts are taken in file order, `batch_size // samples` at a time (at least one);
each is rendered with the source's chat template and repeated K times, so one sampler
call generates every sample of a chunk (a short last chunk is padded with copies, keeping
one compilation). Chunk c is sampled with a seed drawn from (seed, c), so the samples of
a prompt depend only on the command and the prompts file, and a resumed run regenerates
exactly what the stopped run would have written. With a `rank` step the samples are then
scored by teacher forcing (likelihood.py). Each prompt's samples go through the filter
chain (filters.py); the kept ones are written with their provenance, the dropped ones are
counted by reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from pathlib import Path

from jaxsft.config import ConfigError
from jaxsft.data.templates import get_template
from jaxsft.eval.generation import stop_ids
from jaxsft.infer import runs
from jaxsft.infer.sampler import Sampling, generate
from jaxsft.model import pretrained
from jaxsft.synth import filters, likelihood, records, verify
from jaxsft.train.metrics import ProgressLine, console


@dataclasses.dataclass(frozen=True)
class Settings:
    source: str
    prompts: str
    out: str
    samples: int = 4
    sampling: Sampling = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=256)
    steps: tuple = ()
    batch_size: int = 16  # sampler rows per call (prompts x samples)


def check(s: Settings) -> None:
    if s.samples < 1 or s.batch_size < 1:
        raise ConfigError(f"--samples {s.samples} and --batch-size {s.batch_size}: expected positive integers")
    if s.samples > 1 and s.sampling.temperature <= 0:
        raise ConfigError(f"--samples {s.samples} with --temperature 0 gives {s.samples} copies of one greedy answer")
    if not 0 < s.sampling.top_p <= 1 or s.sampling.top_k < 0 or s.sampling.max_new_tokens < 1:
        raise ConfigError("--top-p must be in (0, 1], --top-k >= 0 and --max-new-tokens >= 1")


def checkpoint_step(source: str) -> int | None:
    """The step a run directory (or RUN/checkpoints/STEP) is loaded at; None for hf:/orbax: sources."""
    if source.startswith(pretrained.PREFIXES):
        return None
    run_dir, step = runs.run_and_step(source)
    steps = [int(p.name) for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit()]
    return step if step is not None else (max(steps) if steps else None)


def chunk_seed(seed: int, chunk: int) -> int:
    return int.from_bytes(hashlib.sha256(f"jaxsft-synth/{seed}/{chunk}".encode()).digest()[:4], "little")


def header(s: Settings, step: int | None) -> dict:
    return {
        "source": s.source,
        "step": step,
        "samples": s.samples,
        "sampling": dataclasses.asdict(s.sampling),
        "batch_size": s.batch_size,
        "filters": filters.describe(s.steps),
    }


class Synthesizer:
    """The loaded model with its template; samples and scores chunks of prompts."""

    def __init__(self, s: Settings):
        self.settings = s
        self.model = runs.load(s.source)
        tokenizer = self.model.tokenizer
        self.template = get_template(self.model.template_name, tokenizer)
        self.template.check(tokenizer)
        self.stops = stop_ids(self.template, tokenizer)

    def prompt_ids(self, prompt: records.Prompt) -> list[int]:
        return [int(t) for t in self.template.render_prompt(prompt.messages, self.model.tokenizer)]

    def samples(self, chunk: list[records.Prompt], index: int, rows: int) -> list[list[filters.Sample]]:
        """The K samples of every prompt of chunk `index` (mean log-likelihoods when ranked)."""
        s, k = self.settings, self.settings.samples
        ids = [self.prompt_ids(p) for p in chunk]
        batch = [p for p in ids for _ in range(k)]
        batch += [batch[-1]] * (rows - len(batch))
        sampling = dataclasses.replace(s.sampling, seed=chunk_seed(s.sampling.seed, index))
        out = generate(self.model.graphdef, self.model.params, batch, self.stops, sampling)[: len(chunk) * k]
        scores = [None] * len(out)
        if filters.needs_likelihood(s.steps):
            scores = likelihood.mean_logprobs(self.model.graphdef, self.model.params, batch, out, rows)
        decode = self.model.tokenizer.decode
        flat = [
            filters.Sample(j % k, decode(new), new, len(new) < s.sampling.max_new_tokens, score)
            for j, (new, score) in enumerate(zip(out, scores))
        ]
        return [flat[i * k : (i + 1) * k] for i in range(len(chunk))]


def _provenance(s: Settings, step: int | None, prompt: records.Prompt, sample: filters.Sample) -> dict:
    return {
        "source": s.source,
        "step": step,
        "prompt_line": prompt.line,
        "sample": sample.index,
        "samples": s.samples,
        "sampling": dataclasses.asdict(s.sampling),
        "filters": [f["name"] for f in filters.describe(s.steps)],
        "results": sample.results,
    }


def _status(totals: dict) -> str:
    dropped = sum(totals["dropped"].values())
    return f"kept {totals['kept']} of {totals['generated']} samples ({dropped} dropped)"


def run(s: Settings, progress: bool = True) -> dict:
    check(s)
    prompts = records.read_prompts(s.prompts)
    step = checkpoint_step(s.source)
    out = records.Output(s.out, header(s, step))
    out.check_unchanged(prompts)
    todo = [p for p in prompts if p.line not in out.done]
    if todo:
        synth = Synthesizer(s)
        per_chunk = max(1, s.batch_size // s.samples)
        rows = per_chunk * s.samples
        bar = ProgressLine(len(prompts), len(prompts) - len(todo), progress, label="synth", unit="prompt")
        try:
            for index in range(0, -(-len(prompts) // per_chunk)):
                chunk = prompts[index * per_chunk : (index + 1) * per_chunk]
                if all(p.line in out.done for p in chunk):
                    continue
                for prompt, samples in zip(chunk, synth.samples(chunk, index, rows)):
                    if prompt.line in out.done:
                        continue
                    check_fn = verify.checker(prompt.task, prompt.reference, prompt.regex)
                    kept, drops = filters.apply(s.steps, samples, check_fn)
                    written = [records.output_record(prompt, x.text, _provenance(s, step, prompt, x)) for x in kept]
                    out.write(prompt, written, len(samples), drops)
                bar.update(len(out.done), _status(out.totals()))
        finally:
            bar.close()
    totals = out.totals()
    _print_totals(totals, Path(s.out))
    return totals


def _print_totals(totals: dict, out: Path) -> None:
    console.print(f"{out}: {totals['prompts']} prompts, {_status(totals)}")
    for reason, n in Counter(totals["dropped"]).most_common():
        console.print(f"  dropped {n:>6}  {reason}")
