#!/usr/bin/env bash
# One short run on a lent GPU (H100 / H200): measured bf16 matmul peak, then tokens/s and MFU of
# the real train step (bench/mfu.py) for
#   1. Llama-3.2-1B shapes, full fine-tuning, 8 x 4096 tokens packed (4 segments a row)
#   2. Llama-3.1-8B shapes, LoRA r16 on all linear layers, bf16 base, 4 x 4096 tokens packed
# with `model.attention=auto` (cuDNN where it can, else xla). Random init (no weights read).
# Budget: under 8 minutes including compiles; every command has its own timeout.
#
#   bash bench/gpu.sh              # on the GPU machine, from anywhere
#   bash bench/gpu.sh --smoke      # tiny shapes on the CPU: proves the script works (CI)
#   bash bench/gpu.sh --preflight  # the real shapes compiled for one H100 on this host: both fit
#                                  # in its 79.1 GiB (CI); 1B 52.09 GiB, 8B LoRA 30.25 GiB (round 14;
#                                  # 1B with remat dots_saveable needed 204 GiB)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
SMOKE=0
PREFLIGHT=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
[[ "${1:-}" == "--preflight" ]] && PREFLIGHT=1

if [[ $SMOKE == 1 ]]; then
  export JAX_PLATFORMS=cpu
  MATMUL=512 STEPS=(--steps 1 --rounds 1) LIMIT=120
  SHAPES=(--set model.d_model=64 --set model.n_layers=2 --set model.n_heads=4 --set model.n_kv_heads=2
          --set model.head_dim=16 --set model.d_ff=128 --set model.vocab_size=256 --set data.max_length=64)
  # 8 rows: CI's fake 8-device CPU mesh splits them over fsdp.
  ONE_B=("${SHAPES[@]}" --set train.global_batch_size=8)
  EIGHT_B=("${SHAPES[@]}" --set train.global_batch_size=8 --set train.loss_chunk=64)
  DTYPE=float32
else
  MATMUL=8192 STEPS=(--steps 5 --rounds 2) LIMIT=210
  # Weights' matmul outputs kept, the rest recomputed: dots_saveable would also keep the xla
  # attention's [T, S] scores (204 GiB); cuDNN's keeps none, so this is the bound for either.
  ONE_B=(--set model.preset=llama-3.2-1b --set data.max_length=4096 --set train.global_batch_size=8
         --set model.remat=dots_with_no_batch_dims_saveable --set train.loss_chunk=8192)
  EIGHT_B=(--set model.preset=llama-3.1-8b --set data.max_length=4096 --set train.global_batch_size=4
           --set model.param_dtype=bfloat16 --set model.remat=full --set train.loss_chunk=4096)
  DTYPE=bfloat16
fi
COMMON=(--set "model.dtype=$DTYPE" --set model.attention=auto --set mesh.data=1 --set mesh.fsdp=-1)
LORA=(--set model.peft.method=lora --set model.peft.rank=16 --set model.peft.alpha=32 --set "model.peft.targets=[all-linear]")

if [[ $PREFLIGHT == 1 ]]; then  # `jaxsft compile` exits non-zero when a job does not fit
  export JAX_PLATFORMS=cpu
  echo "== bench/gpu.sh --preflight: both jobs compiled for one H100 (compile-only CUDA device)"
  "$PYTHON" -m jaxsft.cli compile --gpu h100x1 "${COMMON[@]}" "${ONE_B[@]}"
  "$PYTHON" -m jaxsft.cli compile --gpu h100x1 "${COMMON[@]}" "${LORA[@]}" "${EIGHT_B[@]}"
  exit 0
fi

echo "== $(date -u +%FT%TZ) bench/gpu.sh$([[ $SMOKE == 1 ]] && echo ' --smoke (CPU, tiny shapes)')"
timeout 120 "$PYTHON" - "$MATMUL" "$DTYPE" <<'EOF'
import sys
sys.path.insert(0, "bench")
import jax
import jax.numpy as jnp
from common import jax_matmul_flops

n, dtype = int(sys.argv[1]), jnp.dtype(sys.argv[2])
flops = jax_matmul_flops(n, n, n, dtype, repeats=10)
print(f"measured {dtype.name} matmul {n}x{n}x{n} on {jax.devices()[0].device_kind}: {flops / 1e12:.3f} TFLOP/s")
EOF
timeout $LIMIT "$PYTHON" bench/mfu.py --header --label "1B full FT, 4096 packed" "${STEPS[@]}" --segments 4 \
  "${COMMON[@]}" "${ONE_B[@]}"
timeout $LIMIT "$PYTHON" bench/mfu.py --label "8B LoRA r16 all-linear, 4096" "${STEPS[@]}" --segments 4 \
  "${COMMON[@]}" "${LORA[@]}" "${EIGHT_B[@]}"
