#!/usr/bin/env bash
# One short run on a lent GPU (H100 / H200): measured bf16 matmul peak, then tokens/s and MFU of
# the real train step (bench/mfu.py) for
#   1. Llama-3.2-1B shapes, full fine-tuning, 8 x 4096 tokens packed (4 segments a row)
#   2. Llama-3.1-8B shapes, LoRA r16 on all linear layers, bf16 base, 4 x 4096 tokens packed
# with `model.attention=auto` (cuDNN where it can, else xla). Random init (no weights read).
# Budget: under 8 minutes including compiles; every command has its own timeout.
#
#   bash bench/gpu.sh            # on the GPU machine, from anywhere
#   bash bench/gpu.sh --smoke    # tiny shapes on the CPU: proves the script works (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1

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
  ONE_B=(--set model.preset=llama-3.2-1b --set data.max_length=4096 --set train.global_batch_size=8
         --set model.remat=dots_saveable --set train.loss_chunk=8192)
  EIGHT_B=(--set model.preset=llama-3.1-8b --set data.max_length=4096 --set train.global_batch_size=4
           --set model.param_dtype=bfloat16 --set model.remat=full --set train.loss_chunk=4096)
  DTYPE=bfloat16
fi
COMMON=(--set "model.dtype=$DTYPE" --set model.attention=auto --set mesh.data=1 --set mesh.fsdp=-1 --segments 4)
LORA=(--set model.peft.method=lora --set model.peft.rank=16 --set model.peft.alpha=32 --set "model.peft.targets=[all-linear]")

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
timeout $LIMIT "$PYTHON" bench/mfu.py --header --label "1B full FT, 4096 packed" "${STEPS[@]}" "${COMMON[@]}" "${ONE_B[@]}"
timeout $LIMIT "$PYTHON" bench/mfu.py --label "8B LoRA r16 all-linear, 4096" "${STEPS[@]}" "${COMMON[@]}" "${LORA[@]}" \
  "${EIGHT_B[@]}"
