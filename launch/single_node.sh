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
# the GPUs this process may use, as CUDA counts them: CUDA_VISIBLE_DEVICES honoured, and no
# MIG lines counted as extra GPUs (`nvidia-smi -L` lists both)
gpus() { .venv/bin/python -c "import torch; print(torch.cuda.device_count())"; }
if [[ $config == gpu_* ]]; then
  extra=(--num_processes "$(gpus)")
else
  # one thread per process: oversubscribed OpenMP threads are 3-8x slower (measured)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
# fail fast on a launcher that starts fewer processes than the config says
export DISTREC_EXPECT_WORLD_SIZE=${DISTREC_EXPECT_WORLD_SIZE:-$( [[ $config == gpu_* ]] && gpus || echo 2)}
exec .venv/bin/accelerate launch --config_file "configs/accelerate/$config.yaml" "${extra[@]}" \
  -m distrec.train --config "$train_yaml" "$@"
