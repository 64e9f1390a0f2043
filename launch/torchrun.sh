#!/usr/bin/env bash
# Launch `longctx train` with torchrun (one process per GPU, or per CPU share on a CPU box).
#   NPROC=4 launch/torchrun.sh configs/tiny-cpu.yaml train.steps=100 [--resume auto]
# Multi-node: run on every node with NNODES, NODE_RANK and MASTER_ADDR set (same MASTER_PORT).
set -euo pipefail
NPROC=${NPROC:-$( (command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l) || echo 2)}
exec torchrun \
  --nproc_per_node="$NPROC" --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
  -m longctx.cli train "$@"
