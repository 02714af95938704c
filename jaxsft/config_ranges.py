"""The allowed range of every number in the config tree, checked at load.

One table, keyed by the field's dotted path (`[]` for each element of a tuple of sections,
`.*` for each value of a mapping). `check(cfg)` walks the whole tree and fails with one
`ConfigError` line naming the key, the value and the range. A test requires an entry here
for every numeric field, so a new number cannot skip the check. Non-finite floats (nan,
inf) are refused while the tree is built (config_load.py). Integers are also bounded by
2**31 - 1: every count here ends up in an int32 somewhere.
"""

from __future__ import annotations

import dataclasses
import math
import typing

from jaxsft.config import Config, ConfigError

INT_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Range:
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False  # low itself is excluded
    high_open: bool = False
    allow: tuple = ()  # extra allowed values (None, -1: "auto")
    text: str = ""  # how the message names the range, where words say it better

    def __contains__(self, x) -> bool:
        if x in self.allow:
            return True
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below

    def __str__(self) -> str:
        if self.text:
            return self.text
        lo = f"{'(' if self.low_open else '['}{self.low:g}"
        hi = f"{self.high:g}{')' if self.high_open else ']'}"
        if self.high == math.inf and (self.low, self.low_open) == (0, False):
            text = "a non-negative number"
        elif self.high == math.inf:
            text = f"> {self.low:g}" if self.low_open else f">= {self.low:g}"
        else:
            text = f"a value in {lo}, {hi}"
        extra = " or ".join(str(a) for a in self.allow)
        return f"{text} (or {extra})" if extra else text


POSITIVE = Range(0, low_open=True, text="a positive number")
AT_LEAST_1 = Range(1, text="a positive number")
NON_NEGATIVE = Range(0)
OFF_OR_POSITIVE = Range(0, text="0 (off) or a positive number")
UNIT = Range(0, 1)  # [0, 1]
UNIT_OPEN = Range(0, 1, high_open=True)  # [0, 1)
MESH_AXIS = Range(1, allow=(-1,))

RANGES: dict[str, Range] = {
    "model.vocab_size": Range(1, allow=(None,)),
    "model.d_model": AT_LEAST_1,
    "model.n_layers": AT_LEAST_1,
    "model.n_heads": AT_LEAST_1,
    "model.n_kv_heads": AT_LEAST_1,
    "model.head_dim": AT_LEAST_1,
    "model.d_ff": AT_LEAST_1,
    "model.rope_theta": POSITIVE,
    "model.norm_eps": Range(0, 1, low_open=True, high_open=True),
    "model.init_std": Range(0, 1),
    "model.sliding_window": OFF_OR_POSITIVE,
    "model.attn_logit_softcap": NON_NEGATIVE,
    "model.final_logit_softcap": NON_NEGATIVE,
    "model.query_pre_attn_scalar": NON_NEGATIVE,
    "model.rope_scaling.factor": POSITIVE,
    "model.rope_scaling.low_freq_factor": POSITIVE,
    "model.rope_scaling.high_freq_factor": POSITIVE,
    "model.rope_scaling.original_max_position": AT_LEAST_1,
    "model.peft.rank": AT_LEAST_1,
    "model.peft.alpha": POSITIVE,
    "model.peft.dropout": UNIT_OPEN,
    "model.peft.top_layers": NON_NEGATIVE,
    "model.peft.adapter_size": AT_LEAST_1,
    "model.peft.num_virtual_tokens": Range(1, 65536),
    "model.peft.prefix_hidden": NON_NEGATIVE,
    "model.peft.quant_block_size": NON_NEGATIVE,
    "data.sources[].weight": NON_NEGATIVE,
    "data.sources[].eval_fraction": UNIT_OPEN,
    "data.sources[].examples": AT_LEAST_1,
    "data.sources[].eval_examples": AT_LEAST_1,
    "data.sources[].phrasings": NON_NEGATIVE,
    "data.stages[].start_step": NON_NEGATIVE,
    "data.stages[].weights.*": NON_NEGATIVE,
    "data.synthetic_train_examples": AT_LEAST_1,
    "data.synthetic_eval_examples": AT_LEAST_1,
    "data.tokenizer_vocab_size": Range(32),
    "data.max_length": Range(8),
    "data.max_dropped_fraction": UNIT,
    "data.worker_count": Range(0, 1024),
    "data.virtual_shards": NON_NEGATIVE,
    "mesh.data": MESH_AXIS,
    "mesh.fsdp": MESH_AXIS,
    "mesh.sequence": MESH_AXIS,
    "mesh.tensor": MESH_AXIS,
    "mesh.dcn_data": AT_LEAST_1,
    "mesh.dcn_fsdp": AT_LEAST_1,
    "mesh.dcn_sequence": AT_LEAST_1,
    "mesh.dcn_tensor": AT_LEAST_1,
    "optim.learning_rate": Range(0, 1, low_open=True),
    "optim.warmup_steps": NON_NEGATIVE,
    "optim.end_learning_rate_ratio": UNIT,
    "optim.weight_decay": UNIT,
    "optim.b1": UNIT_OPEN,
    "optim.b2": UNIT_OPEN,
    "optim.eps": Range(0, 1, low_open=True, high_open=True),
    "optim.clip_norm": POSITIVE,
    "optim.drift_penalty": NON_NEGATIVE,
    "train.steps": AT_LEAST_1,
    "train.global_batch_size": AT_LEAST_1,
    "train.micro_batches": AT_LEAST_1,
    "train.loss_chunk": Range(0, text="0 (off) or a positive number of tokens"),
    "train.seed": NON_NEGATIVE,
    "train.eval_every": AT_LEAST_1,
    "train.eval_batches": AT_LEAST_1,
    "train.max_skipped_steps": AT_LEAST_1,
    "checkpoint.every": AT_LEAST_1,
    "checkpoint.keep": AT_LEAST_1,
    "logging.log_every": AT_LEAST_1,
    "eval.max_new_tokens": AT_LEAST_1,
    "eval.batch_size": AT_LEAST_1,
    "eval.generate_n": NON_NEGATIVE,
}


def _is_number(tp) -> bool:
    args = typing.get_args(tp)
    return tp in (int, float) or (
        bool(args) and any(a in (int, float) for a in args) and typing.get_origin(tp) is not tuple
    )


def numeric_fields(cls=Config, prefix: str = ""):
    """(table key, annotation) of every numeric leaf under the section `cls`."""
    for f in dataclasses.fields(cls):
        tp, key = typing.get_type_hints(cls)[f.name], prefix + f.name
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            yield from numeric_fields(tp, key + ".")
        elif origin is tuple and args and dataclasses.is_dataclass(args[0]):
            yield from numeric_fields(args[0], key + "[].")
        elif origin is dict and args[1] in (int, float):
            yield key + ".*", args[1]
        elif _is_number(tp):
            yield key, tp


def _values(node, path: list[str], shown: str):
    """(shown key, value) for each value at `path` below `node`."""
    if not path:
        yield shown, node
        return
    head, rest = path[0], path[1:]
    if head == "*":
        for k, v in node.items():
            yield from _values(v, rest, f"{shown}.{k}")
    elif head.endswith("[]"):
        for i, item in enumerate(getattr(node, head[:-2])):
            yield from _values(item, rest, f"{shown}.{head[:-2]}[{i}]".lstrip("."))
    else:
        yield from _values(getattr(node, head), rest, f"{shown}.{head}".lstrip("."))


def _split(key: str) -> list[str]:
    return [p for p in key.replace("[].", "[]|").replace(".", "|").split("|") if p]


def check(cfg: Config) -> None:
    for key, allowed in RANGES.items():
        for shown, value in _values(cfg, _split(key), ""):
            if isinstance(value, int) and not isinstance(value, bool) and value > INT_MAX:
                raise ConfigError(f"{shown}={value}: expected at most {INT_MAX}")
            if value not in allowed:
                raise ConfigError(f"{shown}={value}: expected {allowed}")
