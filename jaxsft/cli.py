"""`jaxsft <verb>`: parses arguments, loads the config, calls one library function.

Expected failures (a bad config, bad data) print one line and exit with status 2;
nothing here holds logic of its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxsft import config as config_lib

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (default: the built-in demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set train.steps=50 (repeatable)")


def _load(args) -> config_lib.Config:
    path = args.config or (DEMO_CONFIG if DEMO_CONFIG.is_file() else None)
    return config_lib.load(path, args.overrides)


def _train(args) -> None:
    from jaxsft.train.trainer import train
    from jaxsft.train.report import print_summary

    print_summary(train(_load(args)))


def _config_show(args) -> None:
    print(config_lib.dump(_load(args)), end="")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="jaxsft", description="JAX-native supervised fine-tuning")
    verbs = root.add_subparsers(dest="verb", required=True)
    train = verbs.add_parser("train", help="train (or resume) the run described by a config")
    _config_args(train)
    train.set_defaults(run=_train)
    config = verbs.add_parser("config", help="inspect configs")
    config_verbs = config.add_subparsers(dest="config_verb", required=True)
    show = config_verbs.add_parser("show", help="print the resolved config, every default visible")
    _config_args(show)
    show.set_defaults(run=_config_show)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from jaxsft.data.pipeline import DataError

    try:
        args.run(args)
    except (config_lib.ConfigError, DataError) as e:
        print(f"jaxsft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxsft: interrupted; the latest checkpoint is kept, run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
