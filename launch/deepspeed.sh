#!/usr/bin/env bash
# Launch `longctx train` with the DeepSpeed launcher.
#   NPROC=2 launch/deepspeed.sh configs/tiny-cpu.yaml train.steps=100
# Multi-node: HOSTFILE=launch/hostfile.example (lines "host slots=N"); the launcher reaches the
# other hosts over passwordless ssh (pdsh when installed).
set -euo pipefail
ARGS=(--master_port "${MASTER_PORT:-29500}" --no_local_rank --module)
if [ -n "${HOSTFILE:-}" ]; then
  ARGS=(--hostfile "$HOSTFILE" "${ARGS[@]}")
else
  ARGS=(--num_gpus "${NPROC:-2}" "${ARGS[@]}")
fi
exec deepspeed "${ARGS[@]}" longctx.cli train "$@"
