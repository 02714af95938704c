"""`jaxsft eval`: loss and generation scores of a run, a step of one, or a Hugging Face directory.

Contract:
    score(source, config_path, overrides, data_files) -> (report dict, samples list)
    run(source, config_path, overrides, data_files, out, compare) -> report dict
        writes `out` (the JSON report) and `samples.jsonl` beside it, prints the table.

Which config: CONFIG when given, else the run's own config.yaml, else the defaults with
the directory's template. It decides the data (its sources' eval splits, or `--data`
files), the template, `data.max_length` (the context: a longer prompt is counted and
skipped) and `eval.*`. So a base model and its fine-tune, given one CONFIG, are scored
on the same records, rendered the same way.

Every number is a function of the parameters and the records: greedy decoding, records
in file order, no sampling seed, so a re-run gives the same report.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from jaxsft import config_load
from jaxsft.config import Config, ConfigError
from jaxsft.data.templates import get_template
from jaxsft.eval import generation, loss, metrics, records
from jaxsft.eval import samples as samples_lib
from jaxsft.infer import runs
from jaxsft.infer.sampler import Sampling
from jaxsft.model import pretrained


def _step_of(run_dir: Path, step: int | None) -> int | None:
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit())
    if step is not None and step not in steps:
        raise ConfigError(f"{run_dir}: no checkpoint at step {step} (steps: {', '.join(map(str, steps)) or 'none'})")
    return step if step is not None else (steps[-1] if steps else None)


def _config(source: str, config_path: str | None, overrides: Sequence[str], template_name: str):
    """(config, run directory or None, step or None)."""
    if source.startswith(pretrained.PREFIXES):
        run_dir, step = None, None
        # Without a CONFIG, the directory's own chat template (an override may still change it).
        overrides = ([] if config_path else [f"data.template={template_name}"]) + list(overrides)
    else:
        run_dir, step = runs.run_and_step(source)
        step = _step_of(run_dir, step)
        config_path = config_path or run_dir / "config.yaml"
    cfg = config_load.load(config_path, list(overrides))
    for key in ("max_new_tokens", "batch_size"):
        if getattr(cfg.eval, key) < 1:
            raise ConfigError(f"eval.{key}={getattr(cfg.eval, key)}: expected a positive integer")
    return cfg, run_dir, step


def _loss_report(model, cfg: Config, items: list[records.Item], drops: dict[str, int]) -> dict:
    groups = defaultdict(list)
    for item in items:
        groups[item.source, item.task, item.split].append(item.conversation)
    sums = loss.loss_by_group(
        model.graphdef, model.params, groups, cfg.data, model.tokenizer, cfg.eval.batch_size, drops
    )

    def summed(keep) -> dict:
        parts = [v for k, v in sums.items() if keep(k)]
        return metrics.loss_summary(*(sum(p[i] for p in parts) for i in range(4)))

    return {
        "overall": summed(lambda k: True),
        "by_source": {s: summed(lambda k, s=s: k[0] == s) for s in dict.fromkeys(k[0] for k in sums)},
        "by_task": {t: summed(lambda k, t=t: k[1] == t) for t in sorted({k[1] for k in sums} - {""})},
        "by_split": {p: summed(lambda k, p=p: k[2] == p) for p in sorted({k[2] for k in sums} - {""})},
    }


def score(
    source: str, config_path: str | None = None, overrides: Sequence[str] = (), data_files: Sequence[str] = ()
) -> tuple[dict, list[dict]]:
    from jaxsft.cache import cache_dir

    source = str(source)
    if not source.startswith(pretrained.PREFIXES) and runs.run_and_step(source)[0].is_dir():
        _step_of(*runs.run_and_step(source))  # a missing step, named with the steps there are, before loading
    model = runs.load(source)
    cfg, run_dir, step = _config(source, config_path, overrides, model.template_name)
    template = get_template(cfg.data.template, model.tokenizer)
    template.check(model.tokenizer)
    splits = records.eval_splits(cfg.data, data_files, cfg.train.seed, cache_dir())
    items, bad = records.read_items(splits, cfg.eval.regex)
    drops: dict[str, int] = {}
    losses = _loss_report(model, cfg, items, drops)
    with_reference = [it for it in items if it.reference is not None]
    sampling = Sampling(max_new_tokens=cfg.eval.max_new_tokens)
    answers = (
        generation.answer(
            model, template, [it.prompt for it in with_reference], cfg.data.max_length, sampling, cfg.eval.batch_size
        )
        if with_reference
        else []
    )
    samples = [samples_lib.sample_of(it, a, cfg.eval.strip_thinking) for it, a in zip(with_reference, answers)]
    too_long = sum(a is None for a in answers)
    notes = []
    if not with_reference:
        notes.append(
            f"no generation metrics: generation metrics need references, and none of the {len(items)} "
            f"records ends with an assistant turn or has a `reference` field"
        )
    if too_long:
        notes.append(f"{too_long} prompts of data.max_length={cfg.data.max_length} tokens or more were skipped")
    report = {
        "source": source,
        "run_dir": str(run_dir) if run_dir else None,
        "step": step,
        "template": cfg.data.template,
        "sources": [s.name for s in splits],
        "records": {
            "read": len(items) + sum(bad.values()),
            "bad": bad,
            "loss_dropped": drops,
            "with_reference": len(with_reference),
            "prompt_too_long": too_long,
        },
        "settings": {
            "max_new_tokens": cfg.eval.max_new_tokens,
            "batch_size": cfg.eval.batch_size,
            "context": cfg.data.max_length,
            "regex": cfg.eval.regex,
        },
        "loss": losses,
        "generation": samples_lib.generation_report(samples) if with_reference else None,
        "notes": notes,
    }
    return report, samples


def _write(report: dict, samples: list[dict], out: Path, samples_name: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    with open(out.parent / samples_name, "w") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")


def default_out(source: str) -> Path:
    """A run's report goes into the run (`RUN/eval/report.json`); others into ./eval/."""
    if str(source).startswith(pretrained.PREFIXES):
        return Path("eval") / "report.json"
    return runs.run_and_step(source)[0] / "eval" / "report.json"


def run(
    source: str,
    config_path: str | None = None,
    overrides: Sequence[str] = (),
    data_files: Sequence[str] = (),
    out: str | Path | None = None,
    compare: str | None = None,
) -> dict:
    from jaxsft.eval.table import print_comparison, print_report

    out = Path(out) if out else default_out(source)
    report, samples = score(source, config_path, overrides, data_files)
    if compare:
        # Scored the same way: the CONFIG, else the first source's (a run's config.yaml).
        shared = config_path or (report["run_dir"] and str(Path(report["run_dir"]) / "config.yaml"))
        other, other_samples = score(compare, shared, overrides, data_files)
        report["compare"] = other
        _write(report, samples, out, "samples.jsonl")
        (out.parent / "samples.compare.jsonl").write_text(
            "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in other_samples)
        )
        print_comparison(report, other)
    else:
        _write(report, samples, out, "samples.jsonl")
        print_report(report)
    print(f"wrote {out} and {out.parent / 'samples.jsonl'}")
    return report
