#!/usr/bin/env bash
# A Cloud TPU pod (or several slices) for jaxsft: create, install, run on every worker, logs.
#
#   TPU_NAME=sft ZONE=us-east5-a ACCELERATOR_TYPE=v5p-32 launch/tpu_pod.sh create
#   TPU_NAME=sft ZONE=us-east5-a launch/tpu_pod.sh install          # copies this checkout, pip install -e '.[tpu]'
#   TPU_NAME=sft ZONE=us-east5-a launch/tpu_pod.sh run configs/my.yaml --set train.steps=1000
#   TPU_NAME=sft ZONE=us-east5-a launch/tpu_pod.sh logs [WORKER]    # tail one worker's log (default 0)
#   TPU_NAME=sft ZONE=us-east5-a launch/tpu_pod.sh delete
#
# SLICES=N (N > 1) creates N slices as one queued resource (multi-slice over DCN); `run`
# then starts the same command on every worker of every slice, and JAX joins them into
# one job. Optional: PROJECT, RUNTIME_VERSION (default v2-alpha-tpuv5), SPOT=1.
# DRY_RUN=1 prints the gcloud commands instead of running them.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
SLICES=${SLICES:-1}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5}
REMOTE_DIR=${REMOTE_DIR:-jaxsft}
LOG=${LOG:-jaxsft-worker.log}

gcloud_() {
  local project=()
  [ -n "${PROJECT:-}" ] && project=(--project "$PROJECT")
  if [ -n "${DRY_RUN:-}" ]; then
    printf 'gcloud'; printf ' %q' "$@" "${project[@]}"; printf '\n'
  else
    gcloud "$@" "${project[@]}"
  fi
}

nodes() {
  if [ "$SLICES" -gt 1 ]; then
    for ((i = 0; i < SLICES; i++)); do echo "$TPU_NAME-$i"; done
  else
    echo "$TPU_NAME"
  fi
}

on_all_workers() {  # the same command on every worker of every slice, in parallel
  local node pids=()
  for node in $(nodes); do
    if [ -n "${DRY_RUN:-}" ]; then  # printed in order, not interleaved
      gcloud_ compute tpus tpu-vm ssh "$node" --zone "$ZONE" --worker=all --command "$1"
      continue
    fi
    gcloud_ compute tpus tpu-vm ssh "$node" --zone "$ZONE" --worker=all --command "$1" &
    pids+=($!)
  done
  for pid in "${pids[@]+"${pids[@]}"}"; do wait "$pid"; done
}

verb=${1:-}; shift || true
case "$verb" in
  create)
    : "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE, e.g. v5p-32}"
    args=(compute tpus queued-resources create "$TPU_NAME" --zone "$ZONE"
          --accelerator-type "$ACCELERATOR_TYPE" --runtime-version "$RUNTIME_VERSION")
    if [ "$SLICES" -gt 1 ]; then args+=(--node-count "$SLICES" --node-prefix "$TPU_NAME"); else args+=(--node-id "$TPU_NAME"); fi
    [ -n "${SPOT:-}" ] && args+=(--spot)
    gcloud_ "${args[@]}"
    ;;
  install)
    for node in $(nodes); do
      gcloud_ compute tpus tpu-vm scp --recurse --zone "$ZONE" --worker=all \
        "$(git rev-parse --show-toplevel)" "$node:$REMOTE_DIR"
    done
    on_all_workers "cd $REMOTE_DIR && python3 -m pip install -q -e '.[tpu]'"
    ;;
  run)
    printf -v cmd ' %q' "$@"
    on_all_workers "cd $REMOTE_DIR && jaxsft train$cmd > ~/$LOG 2>&1"
    ;;
  logs)
    gcloud_ compute tpus tpu-vm ssh "$(nodes | head -n 1)" --zone "$ZONE" --worker="${1:-0}" --command "tail -n 100 ~/$LOG"
    ;;
  delete)
    gcloud_ compute tpus queued-resources delete "$TPU_NAME" --zone "$ZONE" --force --quiet
    ;;
  *)
    echo "usage: $0 create|install|run|logs|delete [ARGS...]" >&2
    exit 2
    ;;
esac
