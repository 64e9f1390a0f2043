#!/usr/bin/env bash
# Launch `longctx train` under MPI; ranks are discovered through mpi4py (`pip install mpi4py
# mpich` gives both the binding and `mpiexec`).
#   NPROC=2 launch/mpirun.sh configs/tiny-cpu.yaml train.steps=100
# Multi-node: HOSTFILE=launch/hostfile.example (MPICH reads "host:slots"; Open MPI "host slots=N").
set -euo pipefail
ARGS=(-n "${NPROC:-2}")
[ -n "${HOSTFILE:-}" ] && ARGS+=(-f "$HOSTFILE")
exec mpiexec "${ARGS[@]}" python -m longctx.cli train "$@"
