#!/usr/bin/env bash
# Multi-node training from the GPU image (docker/Dockerfile.gpu): the same accelerate +
# DeepSpeed ZeRO-2 launch as launch/multinode.sh, each node running it inside a container.
# Run on EVERY node, the same command except NODE_RANK (0 on the head, whose address is HEAD_IP):
#   IMAGE=registry.example.com/distrec:gpu NUM_NODES=2 NODE_RANK=0 HEAD_IP=10.0.0.1 \
#     bash launch/multinode_docker.sh configs/train/beauty_text.yaml \
#       data.dir=/shared/data/beauty run.dir=/shared/runs/beauty
# Needs: the image on every node (docker pull), docker with the NVIDIA container toolkit,
# /shared on a shared file system mounted at the same path on every node, port 29500 open
# between nodes. The container uses the host network (NCCL and the rendezvous see the
# node's interfaces) and runs as the image's non-root user (uid 1000): /shared/runs must be
# writable by it. Tracker keys (WANDB_API_KEY, ...) are passed through from the environment,
# never written into the command or the image.
# NCCL: set NCCL_SOCKET_IFNAME to the interface the nodes reach each other on (e.g. eth0,
# ens5; NCCL otherwise may pick docker0 or lo and hang at the first collective) and, with
# InfiniBand, NCCL_IB_HCA (e.g. mlx5); they are passed through by name, and /dev/infiniband
# is given to the container when the node has it (NCCL_IB_DISABLE=1 forces TCP).
set -euo pipefail
: "${IMAGE:?}" "${NUM_NODES:?}" "${NODE_RANK:?}" "${HEAD_IP:?}"
train_yaml=$1; shift
# GPUs as CUDA counts them inside the container (MIG lines of `nvidia-smi -L` are not GPUs)
gpus=$(docker run --rm --gpus all "$IMAGE" python -c "import torch; print(torch.cuda.device_count())")
ib=()
[[ -d /dev/infiniband ]] && ib=(--device /dev/infiniband --cap-add IPC_LOCK)
exec docker run --rm --gpus all --network host --ipc host --shm-size 16g \
  --ulimit memlock=-1 --ulimit nofile=65536:65536 "${ib[@]}" \
  -v /shared:/shared -e WANDB_API_KEY -e HF_HUB_OFFLINE=1 \
  -e NCCL_SOCKET_IFNAME -e NCCL_IB_HCA -e NCCL_IB_DISABLE -e NCCL_DEBUG \
  -e DISTREC_EXPECT_WORLD_SIZE=$((NUM_NODES * gpus)) \
  "$IMAGE" \
  accelerate launch --config_file configs/accelerate/multinode_zero2.yaml \
    --num_machines "$NUM_NODES" --num_processes $((NUM_NODES * gpus)) --machine_rank "$NODE_RANK" \
    --main_process_ip "$HEAD_IP" --main_process_port 29500 \
    -m distrec.train --config "$train_yaml" "$@"
