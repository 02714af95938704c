"""The config tree: one typed, frozen description of a whole run.

A run is `Config` and nothing else. YAML files state only what differs from the
defaults here; a field with a fixed set of values says so in its `Literal[...]` type.
Loading, `--set a.b=c` overrides and saving live in config_load.py, cross-field checks in
config_checks.py. Every error is a `ConfigError` whose message is one line naming the key,
the value and what was expected, raised before any data is read or anything is compiled.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

LOGICAL_AXES = ("batch", "length", "embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "layers")
# Outer to inner: `tensor` talks most, so it gets the fastest links; `sequence` splits the
# length axis of activations (GSPMD gathers keys and values for attention).
MESH_AXES = ("data", "fsdp", "sequence", "tensor")


class ConfigError(ValueError):
    """A bad config: the message is one line, fit to print as it is."""


DType = Literal["float32", "bfloat16"]
# dots_* save those matmul outputs; offload saves them to host memory instead.
Remat = Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "offload"]
# Named tables of mesh.rules (STRATEGIES below); "": the rules as written.
Strategy = Literal["", "dp", "fsdp", "tp", "fsdp_tp"]
# The built-in synthetic data (docs/quality.md): the demo's seven tasks, the quality suite's
# instruction families, or the `text` corpus of the suite's generated world.
SyntheticTasks = Literal["demo", "quality", "quality_text"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 style frequency scaling (`rope_scaling.rope_type: llama3` in Hugging Face)."""

    type: Literal["none", "llama3"] = "none"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """Parameter-efficient fine-tuning (jaxsft/model/peft.py); method none is full fine-tuning."""

    method: Literal["none", "lora", "dora", "freeze", "adapter", "prefix_tuning", "prompt_tuning"] = "none"
    # lora / dora: adapters on block projections
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter branch's input (training only)
    targets: tuple[str, ...] = ("q", "v")  # q k v o gate up down | all-linear | a regex over param paths
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank
    init_from: str = ""  # a HF PEFT adapter directory to continue training from (same rank and targets)
    # freeze: regexes over param paths ("embedding", "final_norm/scale", "blocks/3/attn/q_bias", ...);
    # only what matches trains
    trainable: tuple[str, ...] = ()
    top_layers: int = 0  # freeze: also train every param of the top N blocks
    # adapter: bottleneck adapters, x + up(act(down(x))) on a block branch's output before the
    # residual add; houlsby: after attention and the MLP, pfeiffer: after the MLP only (model/bottleneck.py)
    adapter_size: int = 64
    adapter_placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    adapter_activation: Literal["relu", "silu", "gelu_tanh"] = "relu"
    # prefix_tuning / prompt_tuning: virtual tokens every example sees first (model/prompts.py)
    num_virtual_tokens: int = 20
    prefix_projection: bool = False  # prefix_tuning: prefixes through a 2-layer tanh MLP while training
    prefix_hidden: int = 0  # that MLP's width; 0: the key/value width n_kv_heads * head_dim (HF PEFT)
    prompt_init_text: str = ""  # prompt_tuning: start from this text's token embeddings ("": random vocab rows)
    # QLoRA (lora / dora): the frozen base's seven block kernels stored quantised (model/quant.py)
    quantize: Literal["none", "int8", "nf4"] = "none"
    quant_block_size: int = 64  # absmax blocks along each kernel's input axis; 0: one scale per output channel
    double_quant: bool = False  # the blocks' scales themselves in int8 (QLoRA's double quantisation)

    @property
    def adapters(self) -> bool:
        return self.method in ("lora", "dora")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # Structure (jaxsft.model.families).
    family: Literal["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"] = "llama"
    # Named shapes (e.g. llama-3.1-8b); a field left at its default here takes the preset's value.
    preset: str = ""
    # "hf:/dir": shapes from its config.json, weights from its safetensors; "orbax:/dir": the
    # output of `jaxsft convert` (same, pre-converted). Read by fresh runs only.
    init_from: str = ""
    vocab_size: int | None = None  # None: the tokenizer's vocabulary size
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 32
    d_ff: int = 384
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    dtype: DType = "float32"  # compute dtype
    param_dtype: DType = "float32"
    scan_layers: bool = True
    remat: Remat = "none"
    rope_scaling: RopeScaling = RopeScaling()
    sliding_window: int = 0  # 0: full attention; mistral: every layer, gemma2: even layers
    attn_logit_softcap: float = 0.0  # 0: off (gemma2: 50)
    final_logit_softcap: float = 0.0  # 0: off (gemma2: 30)
    query_pre_attn_scalar: float = 0.0  # queries scaled by its -1/2 power; 0: head_dim
    # xla (reference, any platform), cudnn (GPU), splash (TPU), pallas_gpu (GPU Triton); auto: the
    # platform's kernel (tpu: splash, gpu: cudnn) where it can compute the call, else xla.
    # Pallas kernels run interpreted on cpu. docs/models.md
    attention: Literal["xla", "cudnn", "splash", "pallas_gpu", "auto"] = "auto"
    peft: PeftConfig = PeftConfig()  # parameter-efficient fine-tuning; full fine-tuning by default


# ModelConfig fields that say how to train, not what the network is. Every other field but
# `preset` is architecture, which a preset or a checkpoint's config.json decides.
MODEL_TRAINING_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "init_std", "init_from", "peft", "attention")
MODEL_ARCHITECTURE_FIELDS = tuple(
    f.name for f in dataclasses.fields(ModelConfig) if f.name not in (*MODEL_TRAINING_FIELDS, "preset")
)


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One data source of a mixture (docs/data.md)."""

    # file or glob (jsonl[.gz], parquet, arrayrecord); tfds: the dataset name; synthetic: a
    # SyntheticTasks name (empty: demo)
    path: str = ""
    type: Literal["auto", "jsonl", "parquet", "arrayrecord", "tfds", "synthetic"] = "auto"  # auto: by extension
    name: str = ""  # in reports and data.stages; default: the file name (or tfds/synthetic name)
    format: Literal["messages", "alpaca", "sharegpt", "prompt_completion", "text"] = "messages"  # data/formats.py
    columns: dict[str, str] = dataclasses.field(default_factory=dict)  # format field -> record key
    weight: float = 1.0  # expected share of sampled examples (or tokens, data.weight_by)
    eval_path: str = ""  # held-out records of this source (same type and format)
    eval_fraction: float = 0.0  # else hold out this share of the records, by position
    split: str = "train"  # tfds split
    eval_split: str = ""  # tfds split for eval
    data_dir: str = ""  # tfds data_dir
    examples: int = 20000  # synthetic: train records
    eval_examples: int = 512  # synthetic: eval records
    phrasings: int = 0  # synthetic quality: train on each family's first N phrasings (0: all not held out)


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """From `start_step` on, sample the sources with these weights (by source name)."""

    start_step: int = 0
    weights: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # Empty: one source from train_files/eval_files (JSONL, `messages`), else the synthetic tasks.
    sources: tuple[SourceConfig, ...] = ()
    stages: tuple[StageConfig, ...] = ()  # a curriculum; empty: the sources' own weights throughout
    weight_by: Literal["examples", "tokens"] = "examples"  # what a source weight is a share of
    # JSONL files in the `messages` format (shorthand for one source).
    train_files: tuple[str, ...] = ()
    eval_files: tuple[str, ...] = ()
    synthetic_train_examples: int = 20000
    synthetic_eval_examples: int = 512
    synthetic_tasks: SyntheticTasks = "demo"  # which built-in set, when no sources or files are given
    template: str = "chatml"  # a name in jaxsft.data.templates.TEMPLATE_NAMES (hf: the tokenizer's own)
    # A SentencePiece .model, or hf:/model/dir; empty means train a SentencePiece model (cached).
    tokenizer: str = ""
    tokenizer_vocab_size: int = 512
    loss_on: Literal["assistant", "last", "all"] = "assistant"
    train_on_eot: bool = True  # the end-of-turn token after a trained turn is trained
    reasoning: Literal["train", "mask", "drop"] = "train"  # what happens to an assistant's `reasoning`
    # data.template=hf, a template that drops some turns' reasoning (Qwen3: all before the last
    # user turn): drop_as_template trains what it renders; keep refuses such conversations.
    reasoning_history: Literal["drop_as_template", "keep"] = "drop_as_template"
    max_length: int = 256  # tokens per packed row
    # truncate keeps the start, whole turns first; truncate_at_length keeps exactly the first
    # max_length targets (the last turn may be partial, as TRL and torchtune cut); drop drops it
    overlong: Literal["truncate", "truncate_at_length", "drop"] = "truncate"
    packing: Literal["first_fit", "best_fit", "concat", "none"] = "first_fit"
    shuffle: bool = True
    on_bad_record: Literal["skip", "raise"] = "skip"  # skip counts and reports; raise stops at the first
    max_dropped_fraction: float = 0.05
    worker_count: int = 0  # Grain worker processes; 0 = in the main process
    # The train stream is V independent streams, each giving a fixed block of every global
    # batch's rows; the batches are the same under any process count, and a process builds
    # only the blocks its devices hold (V a multiple of the processes avoids duplicate work).
    # Divides train.global_batch_size; 0: its largest divisor up to 8.
    virtual_shards: int = 0


@dataclasses.dataclass(frozen=True)
class LogicalRules:
    """Which mesh axes each logical axis is split over (empty: replicated)."""

    batch: tuple[str, ...] = ("data", "fsdp")
    # `sequence` splits the length of activations; weights are split over it as over fsdp
    # (ZeRO-3 over every axis that splits the tokens), else each sequence group holds a copy.
    length: tuple[str, ...] = ("sequence",)
    embed: tuple[str, ...] = ("fsdp", "sequence")
    mlp: tuple[str, ...] = ("tensor",)
    heads: tuple[str, ...] = ("tensor",)
    kv_heads: tuple[str, ...] = ("tensor",)
    head_dim: tuple[str, ...] = ()
    vocab: tuple[str, ...] = ("tensor",)
    layers: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: all devices not used by the other axes (of one slice when dcn_* > 1)
    fsdp: int = 1
    sequence: int = 1
    tensor: int = 1
    # Multi-slice / multi-node: each axis is also split this many ways over the slow network
    # (DCN); the mesh axis is then ici * dcn long (docs/training.md, "Hybrid meshes").
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_sequence: int = 1
    dcn_tensor: int = 1
    strategy: Strategy = ""
    rules: LogicalRules = LogicalRules()


_TP = ("tensor",)
# Named sharding strategies: presets of the logical-to-mesh rules. Axes of size 1 drop
# out, so each preset still runs on any mesh shape.
STRATEGIES: dict[Strategy, LogicalRules] = {
    # Replicated weights and optimizer state; the batch over every data-like axis.
    "dp": LogicalRules(embed=(), mlp=(), heads=(), kv_heads=(), vocab=()),
    # ZeRO-3 style: weights and moments split on their embedding dimension over fsdp.
    "fsdp": LogicalRules(mlp=(), heads=(), kv_heads=(), vocab=()),
    # Megatron style: heads, MLP and vocabulary split over tensor; batch over data only.
    "tp": LogicalRules(batch=("data",), embed=()),
    # Both: the default table.
    "fsdp_tp": LogicalRules(mlp=_TP, heads=_TP, kv_heads=_TP, vocab=_TP),
}


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    end_learning_rate_ratio: float = 0.1  # cosine decays to this share of the peak
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    moments_dtype: DType = "float32"  # Adam's two moments (bfloat16: half the bytes)
    # L2-SP: each step adds drift_penalty * ||theta - theta_0||^2 over the trained params,
    # theta_0 the run's starting weights (0: off; docs/training.md, forgetting control).
    drift_penalty: float = 0.0
    drift_anchor_dtype: DType = "float32"  # theta_0's copy (bfloat16: half the bytes)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/demo"
    steps: int = 300
    global_batch_size: int = 16  # packed rows per optimizer step, over all devices
    micro_batches: int = 1  # gradient accumulation: rows are split into this many
    # > 0: cross-entropy over chunks of this many tokens, never the full [B, T, V] logits,
    # its gradient in the same pass (train/loss.py); 0: from the full logits
    loss_chunk: int = 1024
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 4
    # A step whose loss or gradient norm is not finite leaves params and optimizer state
    # unchanged; this many such steps in a row stop the run (exit code 3, docs/reliability.md).
    max_skipped_steps: int = 10


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    enabled: bool = True
    every: int = 100
    keep: int = 2
    async_save: bool = True
    # A checkpoint whose checksums or values do not verify at restore: fallback moves it aside
    # and resumes from the newest good one with a warning; fail stops (exit code 5).
    on_corrupt: Literal["fallback", "fail"] = "fallback"


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    progress: bool = True  # rich progress bar; off gives one line per log_every
    log_every: int = 10
    metrics_file: str = "metrics.jsonl"
    tensorboard: bool = True  # event files in RUN/tensorboard/ (tensorboardX; no TensorFlow)
    plot: bool = True  # RUN/loss.png at each eval and at the end
    wandb: str = ""  # a Weights & Biases project: log there too when `wandb` is installed


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """`jaxsft eval` (docs/evaluation.md)."""

    max_new_tokens: int = 64  # greedy answer length cap
    batch_size: int = 16  # prompts per generation batch, rows per loss batch
    regex: str = ""  # scored as regex_match on every answer (a record's reference_regex wins)
    # Training: at every train.eval_every, this many held-out prompts are answered and scored
    # (spread over the eval splits, the same prompts each time); 0 turns it off.
    generate_n: int = 32
    # Score the text after an answer's last `</think>` (reasoning models); samples keep the whole output.
    strip_thinking: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    eval: EvalConfig = EvalConfig()
