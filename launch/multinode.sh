#!/usr/bin/env bash
# Training on N GPU nodes with accelerate + DeepSpeed ZeRO-2. Run on EVERY node, the same
# command except NODE_RANK (0 on the head, whose address is HEAD_IP):
#   NUM_NODES=2 NODE_RANK=0 HEAD_IP=10.0.0.1 bash launch/multinode.sh configs/train/beauty_text.yaml \
#       data.dir=/shared/data/beauty run.dir=/shared/runs/beauty
# Needs: the same checkout and environment on every node, data.dir and run.dir on a shared
# file system, port 29500 open between nodes. For ZeRO-3 point --config_file at a copy of
# configs/accelerate/multinode_zero2.yaml whose deepspeed_config_file is configs/deepspeed/zero3.json.
set -euo pipefail
: "${NUM_NODES:?}" "${NODE_RANK:?}" "${HEAD_IP:?}"
train_yaml=$1; shift
cd "$(dirname "$0")/.."
gpus=$(.venv/bin/python -c "import torch; print(torch.cuda.device_count())")  # CUDA_VISIBLE_DEVICES honoured, MIG lines not counted
export DISTREC_EXPECT_WORLD_SIZE=$((NUM_NODES * gpus))
exec .venv/bin/accelerate launch --config_file configs/accelerate/multinode_zero2.yaml \
  --num_machines "$NUM_NODES" --num_processes $((NUM_NODES * gpus)) --machine_rank "$NODE_RANK" \
  --main_process_ip "$HEAD_IP" --main_process_port 29500 \
  -m distrec.train --config "$train_yaml" "$@"
