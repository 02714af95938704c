#!/usr/bin/env bash
# jaxsft on several machines without a scheduler: run this on every node.
#
#   COORDINATOR=10.0.0.1:1234 NNODES=4 NODE_RANK=0 launch/multinode.sh configs/my.yaml --set ...
#
# One process per node drives all of the node's accelerators. NODE_RANK 0 hosts the
# coordinator at COORDINATOR (reachable from every node). Output goes to the terminal.
set -euo pipefail

: "${COORDINATOR:?set COORDINATOR=host:port (node 0)}" "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}"
export JAXSFT_COORDINATOR="$COORDINATOR" JAXSFT_NUM_PROCESSES="$NNODES" JAXSFT_PROCESS_ID="$NODE_RANK"
exec jaxsft train "$@"
