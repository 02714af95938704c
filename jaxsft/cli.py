"""`jaxsft <verb>`: parses arguments, loads the config, calls one library function.

Expected failures (a bad config, bad data) print one line and exit with status 2;
nothing here holds logic of its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxsft import config as config_lib
from jaxsft import config_load, hostmem, quiet

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxsft")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (default: the built-in demo)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set train.steps=50 (repeatable)",
    )


def _load(args) -> config_lib.Config:
    path = args.config or (DEMO_CONFIG if DEMO_CONFIG.is_file() else None)
    return config_load.load(path, args.overrides)


def _train(args) -> None:
    from jaxsft.train.report import print_summary
    from jaxsft.train.trainer import train

    print_summary(train(_load(args), allow_config_change=args.allow_config_change))


def _config_show(args) -> None:
    print(config_load.dump(_load(args)), end="")


def _model_info(args) -> None:
    from jaxsft.model.info import describe, format_groups, param_groups

    cfg, vocab_size = describe(args.name)
    print(format_groups(args.name, cfg, param_groups(cfg, vocab_size)))


def _export(args) -> None:
    from jaxsft.infer.runs import export_adapter, export_hf, export_peft

    if args.format in ("peft", "adapter"):
        export = export_peft if args.format == "peft" else export_adapter
        print(f"wrote {args.out}: {', '.join(export(args.run_dir, args.out))}")
        return
    files = export_hf(
        args.run_dir, args.out, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 1024**3), merge=args.merge
    )
    print(f"wrote {args.out}: config.json, {', '.join(files)}")


def _convert(args) -> None:
    from jaxsft.infer.convert import convert

    out = convert(args.source, args.out, args.param_dtype)
    print(
        f"wrote {out}: params/ (Orbax), config.json and tokenizer files; train from it with "
        f"--set model.init_from=orbax:{out}"
    )


def _sampling(args):
    from jaxsft.infer.sampler import Sampling

    return Sampling(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )


def _sampling_args(parser: argparse.ArgumentParser, temperature: float = 0.0, top_p: float = 1.0) -> None:
    greedy = "0 = greedy (default)" if temperature == 0 else f"0 = greedy (default {temperature:g})"
    parser.add_argument("--temperature", type=float, default=temperature, help=greedy)
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    parser.add_argument(
        "--top-p", type=float, default=top_p, help=f"nucleus sampling mass (1 = off; default {top_p:g})"
    )
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)


def _generate(args) -> None:
    from jaxsft.infer.chat import generate_file

    n = generate_file(args.source, args.prompts, args.out, _sampling(args), args.batch_size)
    print(f"wrote {n} completions to {args.out}")


def _chat(args) -> None:
    from jaxsft.infer.chat import chat

    def read():
        try:
            return input("> ")
        except EOFError:  # Ctrl-D: leave
            print()
            return None
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, as in a shell
            print()
            return ""

    chat(args.source, _sampling(args), args.system, read, print, lambda text: print(text, file=sys.stderr))


def _add_model_verbs(verbs) -> None:
    model = verbs.add_parser("model", help="inspect model shapes")
    model_verbs = model.add_subparsers(dest="model_verb", required=True)
    info = model_verbs.add_parser("info", help="parameter counts by group (no weights are allocated)")
    info.add_argument("name", help="a preset name (e.g. llama-3.1-8b) or a Hugging Face model directory")
    info.set_defaults(run=_model_info)
    export = verbs.add_parser("export", help="write a run's latest checkpoint as a Hugging Face model directory")
    export.add_argument("run_dir")
    export.add_argument("out")
    export.add_argument(
        "--format",
        choices=["hf", "peft", "adapter"],
        default="hf",
        help="peft: a LoRA/DoRA, prefix- or prompt-tuning run's trained part in Hugging Face PEFT's format "
        "(adapter_config.json + adapter_model.safetensors); adapter: a bottleneck-adapter run's adapters "
        "(our format, docs/training.md)",
    )
    export.add_argument(
        "--merge", action="store_true", help="hf format of a PEFT run: its trained part merged into the base"
    )
    export.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: model.param_dtype")
    export.add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size")
    export.set_defaults(run=_export)
    convert = verbs.add_parser("convert", help="convert a Hugging Face directory into an Orbax checkpoint")
    convert.add_argument("source", help="hf:/path/to/model_dir")
    convert.add_argument("out")
    convert.add_argument("--param-dtype", choices=["float32", "bfloat16"], default="float32")
    convert.set_defaults(run=_convert)
    generate = verbs.add_parser("generate", help="complete every prompt of a JSONL file")
    generate.add_argument("source", help="a run directory or hf:/path")
    generate.add_argument("--prompts", required=True, help='JSONL: {"messages": [...]} or {"prompt": "..."}')
    generate.add_argument("--out", required=True)
    generate.add_argument("--batch-size", type=int, default=8)
    _sampling_args(generate)
    generate.set_defaults(run=_generate)
    chat = verbs.add_parser("chat", help="interactive chat with a run or hf:/path")
    chat.add_argument("source", help="a run directory or hf:/path")
    chat.add_argument("--system", default=None, help="system prompt")
    _sampling_args(chat)
    chat.set_defaults(run=_chat)


def _data_preview(args) -> None:
    from jaxsft.data.inspect import preview

    print(preview(_load(args), n=args.n, color=sys.stdout.isatty() and not args.plain))


def _data_stats(args) -> None:
    from jaxsft.data.inspect import stats

    print(stats(_load(args)))


def _data_check_template(args) -> int:
    from jaxsft.data.check_template import check_template

    lines, ok = check_template(args.tokenizer_dir)
    print("\n".join(lines))
    return 0 if ok else 1


def _eval(args) -> None:
    from jaxsft.eval.evaluate import run

    run(args.source, args.config, args.overrides, args.data, args.out, args.compare)


def _add_eval_verb(verbs) -> None:
    eval_ = verbs.add_parser(
        "eval", help="loss and generation scores of a run, a checkpoint or hf:/dir (docs/evaluation.md)"
    )
    eval_.add_argument("source", help="a run directory, RUN/checkpoints/STEP, or hf:/path")
    eval_.add_argument(
        "config", nargs="?", help="YAML config for the data, template and eval.* (default: the run's config.yaml)"
    )
    eval_.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set eval.max_new_tokens=32 (repeatable)",
    )
    eval_.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="FILE",
        help="score this file (JSONL messages, repeatable) instead of the config's eval splits",
    )
    eval_.add_argument(
        "--out",
        default=None,
        help="the JSON report (default: RUN/eval/report.json, or eval/report.json); samples.jsonl goes beside it",
    )
    eval_.add_argument(
        "--compare",
        default=None,
        metavar="OTHER_SOURCE",
        help="score this source on the same data too, and print both side by side",
    )
    eval_.set_defaults(run=_eval)


def _synth(args) -> None:
    from jaxsft.synth import filters
    from jaxsft.synth.generate import Settings, run

    steps = filters.parse(args.filter, args.filters)
    run(Settings(args.source, args.prompts, args.out, args.samples, _sampling(args), steps, args.batch_size))


def _add_synth_verb(verbs) -> None:
    synth = verbs.add_parser(
        "synth", help="sample K answers per prompt, filter and rank them, write training records (docs/synth.md)"
    )
    synth.add_argument("source", help="a run directory, RUN/checkpoints/STEP, or hf:/path")
    synth.add_argument("--prompts", required=True, help='JSONL: {"messages": [...]} or {"prompt": "..."}')
    synth.add_argument("--out", required=True, help="JSONL of kept records (resumed when it exists)")
    synth.add_argument("--samples", type=int, default=4, help="responses per prompt (default 4)")
    synth.add_argument("--batch-size", type=int, default=16, help="sampler rows per call (default 16)")
    synth.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="NAME[:K=V,...]",
        help="a filter step, in order (repeatable): verify, length, repetition, dedup, near_dedup, majority, rank",
    )
    synth.add_argument("--filters", default=None, metavar="FILE", help="YAML list of filter steps (before --filter)")
    _sampling_args(synth, temperature=1.0, top_p=0.95)
    synth.set_defaults(run=_synth)


def _add_data_verbs(verbs) -> None:
    data = verbs.add_parser("data", help="inspect the data a config trains on")
    data_verbs = data.add_subparsers(dest="data_verb", required=True)
    preview = data_verbs.add_parser("preview", help="examples as the model sees them, trained tokens marked")
    _config_args(preview)
    preview.add_argument("--n", type=int, default=3, help="examples per source (default 3)")
    preview.add_argument("--plain", action="store_true", help="mark trained tokens with [[...]], not colour")
    preview.set_defaults(run=_data_preview)
    stats = data_verbs.add_parser("stats", help="per-source counts, drops, epochs, packing efficiency, lengths")
    _config_args(stats)
    stats.set_defaults(run=_data_stats)
    check = data_verbs.add_parser(
        "check-template",
        help="render a battery of conversations with a model's chat "
        "template: ids equal transformers', masks sane, or refused",
    )
    check.add_argument("tokenizer_dir", help="a Hugging Face model or tokenizer directory (tokenizer.json + template)")
    check.set_defaults(run=_data_check_template)


def _compile(args) -> None:
    from jaxsft.train import aot

    base = _load(args)
    if args.gpu:
        devices, chip, chips = aot.gpu_topology(args.gpu, args.hosts)
        target = f"{args.hosts} x {args.gpu}"
    else:
        devices, chip, chips = aot.topology(args.topology, args.slices)
        target = args.topology
    variants = [("", [])] + [(v, [kv for kv in v.split(",") if kv]) for v in args.sweep]
    reports = []
    for label, overrides in variants[1:] if args.sweep else variants:
        cfg = config_load.from_dict(config_load.apply_overrides(config_load.to_dict(base), overrides))
        reports.append(aot.compile_for(cfg, devices, chip, chips, label or target))
        if not args.sweep:
            print("\n".join(aot.format_report(reports[-1])))
    if args.sweep:
        print("\n".join(aot.sweep_table(reports)))
    misfits = [r for r in reports if not r.fits]
    if misfits and not args.sweep:
        r = misfits[0]
        raise config_lib.ConfigError(
            f"does not fit: needs {r.total_bytes / aot.GIB:.1f} GiB of "
            f"{r.capacity_bytes / aot.GIB:.1f} GiB per device on {target}"
        )


def _add_compile_verb(verbs) -> None:
    compile_ = verbs.add_parser(
        "compile", help="compile the train step for a TPU slice or GPU cluster on this host (pre-flight)"
    )
    _config_args(compile_)
    target = compile_.add_mutually_exclusive_group(required=True)
    target.add_argument("--topology", help="Cloud TPU slice, e.g. v5p-32, v5e-16, v6e-8, v4-16")
    target.add_argument("--gpu", help="GPUs per host, e.g. h100x8 (compile-only CUDA devices)")
    compile_.add_argument("--slices", type=int, default=1, help="TPU: number of such slices joined over DCN")
    compile_.add_argument("--hosts", type=int, default=1, help="GPU: number of such hosts")
    compile_.add_argument(
        "--sweep",
        nargs="+",
        default=[],
        metavar="K=V,K=V",
        help="compile each variant (comma-separated overrides) and print one table",
    )
    compile_.set_defaults(run=_compile)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="jaxsft", description="JAX-native supervised fine-tuning")
    root.add_argument("--version", action="version", version=f"jaxsft {_version()}")
    verbs = root.add_subparsers(dest="verb", required=True)
    train = verbs.add_parser("train", help="train (or resume) the run described by a config")
    _config_args(train)
    train.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume a run directory with a config other than its config.yaml; the change is "
        "recorded in config_history.jsonl",
    )
    train.set_defaults(run=_train)
    config = verbs.add_parser("config", help="inspect configs")
    config_verbs = config.add_subparsers(dest="config_verb", required=True)
    show = config_verbs.add_parser("show", help="print the resolved config, every default visible")
    _config_args(show)
    show.set_defaults(run=_config_show)
    _add_model_verbs(verbs)
    _add_eval_verb(verbs)
    _add_synth_verb(verbs)
    _add_data_verbs(verbs)
    _add_compile_verb(verbs)
    return root


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the `jaxsft` command itself, not a caller in this process (tests)
        hostmem.reexec_with_tunables()  # before JAX exists: malloc's huge pages (jaxsft/hostmem.py)
    args = parser().parse_args(argv)
    quiet.quiet_start(args.verb)  # before JAX loads: no benign runtime noise on a CPU host
    from jaxsft.data.formats import DataError
    from jaxsft.train.faults import RunStopped

    try:
        status = args.run(args)  # a verb returns a status of its own only when it fails a check
    except (config_lib.ConfigError, DataError) as e:
        print(f"jaxsft: error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:  # exit codes: jaxsft/train/faults.py, docs/reliability.md
        print(f"jaxsft: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        resume = "; the latest checkpoint is kept, run the same command to resume" if args.verb == "train" else ""
        print(f"jaxsft: interrupted{resume}", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
