"""jaxsft's compiled train step against Hugging Face eager PyTorch, side by side on this machine.

    python bench/vs_hf.py [--sizes S,M] [--rounds 5] [--steps 2]

Same Llama shapes (bench/common.py SIZES: S 7.4M, M 40M, L 205M params), same batch of
random tokens, float32, full fine-tuning with AdamW and global-norm clipping at 1.0 on both:
`transformers.LlamaForCausalLM` (sdpa attention, untied head) + `torch.optim.AdamW`
against the step `jaxsft train` runs (program.build, state.initial_state). After a warm-up,
rounds alternate between the two (which goes first alternates too), so machine noise hits
both alike; prints median tokens/s of each, the ratio of the medians, the median of the
rounds' paired ratios (each round's two runs are adjacent in time, so a slow minute of the
machine slows both halves of a pair: the steadier estimate on a noisy host), and achieved model FLOP/s
(aot.model_flops) as a share of each library's own measured float32 matmul peak (the
faster of the step's MLP and head matmul shapes; jaxsft's as its step does them, through
jaxsft/model/blas.py on one CPU device). Torch and XLA both use the machine's
cores (torch threads set to os.cpu_count(); XLA's CPU client uses them all by default).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from jaxsft import hostmem

if __name__ == "__main__":  # run as a script (not imported by a test): the malloc `jaxsft train` runs with
    hostmem.reexec_with_tunables()  # jaxsft/hostmem.py

import jax
import numpy as np
import torch
from common import jax_matmul_flops, matmul_shapes, random_batch, size_config

from jaxsft.model.transformer import param_count
from jaxsft.train import aot, sharding
from jaxsft.train import program as program_lib
from jaxsft.train import state as state_lib


def jaxsft_runner(cfg, vocab, batch_np):
    """A callable that runs `steps` train steps and blocks; the state lives in the closure."""
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    program = program_lib.build(cfg, vocab, mesh)
    holder = list(state_lib.initial_state(cfg, vocab, program.optimizer, program.plan))
    step = program.compile_train()
    batch = sharding.global_batch(batch_np, program.batch_sharding)

    def run(steps: int) -> float:
        for _ in range(steps):
            holder[0], metrics = step(holder[0], batch, *holder[1])
        return float(metrics["loss"])  # blocks

    return run


def hf_runner(cfg, vocab, batch_np):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    hf_cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=m.d_model,
        intermediate_size=m.d_ff,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads,
        head_dim=m.head_dim,
        rms_norm_eps=m.norm_eps,
        max_position_embeddings=cfg.data.max_length,
        tie_word_embeddings=False,
        initializer_range=m.init_std,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_cfg).float().train()
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
    )
    inputs = torch.from_numpy(batch_np["inputs"]).long()
    targets = torch.from_numpy(batch_np["targets"]).long()

    def run(steps: int) -> float:
        for _ in range(steps):
            logits = model(input_ids=inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
            optimizer.step()
        return float(loss.detach())

    return run


def torch_matmul_flops(m: int, k: int, n: int, repeats: int = 5) -> float:
    a, b = torch.ones(m, k), torch.ones(k, n)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times)


def compare(name: str, rounds: int, steps: int) -> dict:
    cfg, vocab = size_config(name)
    rows, length = cfg.train.global_batch_size, cfg.data.max_length
    batch = random_batch(np.random.default_rng(0), rows, length, vocab)
    runners = {"hf": hf_runner(cfg, vocab, batch), "jaxsft": jaxsft_runner(cfg, vocab, batch)}
    for run in runners.values():
        run(1)  # warm-up (compiles, allocates)
    seconds = {k: [] for k in runners}
    for r in range(rounds):
        for k in list(runners) if r % 2 == 0 else list(runners)[::-1]:
            start = time.perf_counter()
            runners[k](steps)
            seconds[k].append((time.perf_counter() - start) / steps)
    shapes = matmul_shapes(cfg, vocab)
    peak = {"hf": max(torch_matmul_flops(*s) for s in shapes), "jaxsft": max(jax_matmul_flops(*s) for s in shapes)}
    flops = aot.model_flops(cfg, vocab)[0]
    out = {"params": param_count(cfg.model, vocab), "tokens": rows * length, "peak": peak}
    # per round: HF's step time over jaxsft's = jaxsft's tokens/s over HF's, for the two runs side by side
    out["paired"] = statistics.median(h / j for h, j in zip(seconds["hf"], seconds["jaxsft"]))
    for k, times in seconds.items():
        step = statistics.median(times)
        out[k] = {
            "step_s": step,
            "tokens_s": rows * length / step,
            "flops_s": flops / step,
            "spread": (max(times) - min(times)) / step,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="S,M", help="comma-separated of S, M, L (L takes minutes)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed round")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    print(
        f"{os.cpu_count()} CPU cores; torch threads {torch.get_num_threads()}; load average "
        f"{os.getloadavg()[0]:.1f}; {args.rounds} alternating rounds of {args.steps} steps; medians"
    )
    print(
        f"{'size':<4} {'params':>8} {'tokens':>6} {'HF tok/s':>9} {'jaxsft tok/s':>12} {'ratio':>6} {'paired':>6} "
        f"{'HF %peak':>9} {'jaxsft %peak':>12} {'torch peak':>11} {'jx peak':>9} {'spread hf/jx':>13}"
    )
    for name in args.sizes.split(","):
        r = compare(name.strip().upper(), args.rounds, args.steps)
        hf, jx = r["hf"], r["jaxsft"]
        print(
            f"{name:<4} {r['params'] / 1e6:7.1f}M {r['tokens']:>6} {hf['tokens_s']:9,.0f} {jx['tokens_s']:12,.0f} "
            f"{jx['tokens_s'] / hf['tokens_s']:6.2f} {r['paired']:6.2f} {hf['flops_s'] / r['peak']['hf']:9.1%} "
            f"{jx['flops_s'] / r['peak']['jaxsft']:12.1%} {r['peak']['hf'] / 1e9:8.0f} GF "
            f"{r['peak']['jaxsft'] / 1e9:6.0f} GF {hf['spread']:6.0%}/{jx['spread']:.0%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
