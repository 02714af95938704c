"""Device memory of one train step: full fine-tuning against LoRA, DoRA, freeze and a chunked loss.

Compiles (does not run) the real train step of `jaxsft train` for a ~110M-parameter
Llama-shaped model on one device and prints the compiled `memory_analysis()`:
arguments (params, optimizer state, frozen params, batch) and temporaries (activations,
gradients, workspace).

    python bench/peft_memory.py [--rows 8] [--length 512] [--remat full]
"""

from __future__ import annotations

import argparse
import dataclasses
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

from jaxsft.config import Config, DataConfig, ModelConfig, PeftConfig, TrainConfig
from jaxsft.model import peft
from jaxsft.train import program as program_lib
from jaxsft.train import sharding

MODEL = ModelConfig(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, head_dim=64, d_ff=2048, tie_embeddings=True)
VOCAB = 32000
METHODS = {  # name: (method, train.loss_chunk)
    "full fine-tuning": (PeftConfig(), 0),
    "full, loss_chunk 1024": (PeftConfig(), 1024),
    "LoRA r8 q,v": (PeftConfig(method="lora", rank=8, targets=("q", "v")), 0),
    "LoRA r8 q,v, loss_chunk 1024": (PeftConfig(method="lora", rank=8, targets=("q", "v")), 1024),
    "LoRA r16 all-linear": (PeftConfig(method="lora", rank=16, targets=("all-linear",)), 0),
    "DoRA r8 q,v": (PeftConfig(method="dora", rank=8, targets=("q", "v")), 0),
    "freeze: top 2 layers + norms": (PeftConfig(method="freeze", trainable=("norm",), top_layers=2), 0),
}


def measure(model: ModelConfig, rows: int, length: int, loss_chunk: int = 0) -> tuple[int, int, int]:
    cfg = Config(
        model=model,
        data=DataConfig(max_length=length),
        train=TrainConfig(steps=100, global_batch_size=rows, loss_chunk=loss_chunk),
    )
    compiled = program_lib.build(cfg, VOCAB, sharding.make_mesh(cfg.mesh, jax.devices()[:1])).compile_train()
    memory = compiled.memory_analysis()
    return peft.count(model, VOCAB)[0], memory.argument_size_in_bytes, memory.temp_size_in_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--remat", default="full")
    args = parser.parse_args()
    total = peft.count(MODEL, VOCAB)[1]
    print(f"model: {total / 1e6:.1f}M params, {args.rows} x {args.length} tokens, remat {args.remat}, one device")
    print(f"{'method':<30} {'trainable':>12} {'arguments MiB':>14} {'temporaries MiB':>16}")
    for name, (method, loss_chunk) in METHODS.items():
        model = dataclasses.replace(MODEL, remat=args.remat, peft=method)
        trainable, arguments, temp = measure(model, args.rows, args.length, loss_chunk)
        print(f"{name:<30} {trainable:>12,} {arguments / 2**20:>14.1f} {temp / 2**20:>16.1f}")


if __name__ == "__main__":
    main()
