#!/usr/bin/env bash
# Training on one machine with accelerate: pick the accelerate config for the machine.
#   bash launch/single_node.sh CONFIG TRAIN_YAML [key=value ...]
# CONFIG: cpu_ddp | cpu_zero2 | cpu_zero3 (2 CPU processes)
#         gpu_ddp | gpu_zero2 | gpu_zero3 | gpu_zero3_offload (one process per GPU)
# e.g.    bash launch/single_node.sh gpu_zero2 configs/train/beauty_text.yaml data.dir=data/beauty run.dir=runs/beauty
# Resume after a crash: the same command with --resume before the overrides.
set -euo pipefail
config=$1; shift
train_yaml=$1; shift
cd "$(dirname "$0")/.."
extra=()
if [[ $config == gpu_* ]]; then
  extra=(--num_processes "$(nvidia-smi -L | wc -l)")
else
  # one thread per process: oversubscribed OpenMP threads are 3-8x slower (measured)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
# fail fast on a launcher that starts fewer processes than the config says
export DISTREC_EXPECT_WORLD_SIZE=${DISTREC_EXPECT_WORLD_SIZE:-$( [[ $config == gpu_* ]] && nvidia-smi -L | wc -l || echo 2)}
exec .venv/bin/accelerate launch --config_file "configs/accelerate/$config.yaml" "${extra[@]}" \
  -m distrec.train --config "$train_yaml" "$@"
