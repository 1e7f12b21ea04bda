#!/bin/bash
# A study across the N GPUs of one machine: one worker process per GPU, each seeing only its own through
# CUDA_VISIBLE_DEVICES.
#
#   convscale sweep examples/convnet-vs-vit.toml --plan      # waves, cost per cell, critical path: pick N
#   examples/slurm/one-node.sh examples/convnet-vs-vit.toml 4
#
# Worker I runs `convscale sweep STUDY --shard I/N` on GPU I and logs to OUT_LOGS/worker-I.log (default
# sweep-logs/). The workers share nothing but the study's runs directory; a worker that died is replaced by running
# the same command again (this script again, or the one line for that worker), and it resumes from its checkpoints.
# On a SLURM node, run this script inside one allocation of N GPUs (`srun --gpus=4 examples/slurm/one-node.sh ...`).
#
# Expected result: the study's runs in its `out` directory, and the same tuning.jsonl as `convscale sweep STUDY`.
set -euo pipefail

study=${1:?usage: one-node.sh STUDY.toml N}
workers=${2:?usage: one-node.sh STUDY.toml N}
logs=${OUT_LOGS:-sweep-logs}
mkdir -p "$logs"
pids=()
for ((i = 0; i < workers; i++)); do
  CUDA_VISIBLE_DEVICES=$i convscale sweep "$study" --shard "$i/$workers" >"$logs/worker-$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "worker $i/$workers failed: see $logs/worker-$i.log; rerun it with" \
      "CUDA_VISIBLE_DEVICES=$i convscale sweep $study --shard $i/$workers" >&2
    status=1
  fi
done
exit $status
