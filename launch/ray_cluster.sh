#!/usr/bin/env bash
# A Ray cluster by hand, and a training job submitted to it.
#   bash launch/ray_cluster.sh head                 # on the head node
#   HEAD=10.0.0.1:6379 bash launch/ray_cluster.sh worker   # on every other node
#   bash launch/ray_cluster.sh submit configs/train/demo.yaml data.dir=/shared/data run.dir=/shared/runs/x \
#        ray.num_workers=4 ray.use_gpu=true ray.zero_stage=2
#   bash launch/ray_cluster.sh stop                 # on every node
# Ray 2.60 has token authentication on: `ray start --head` creates the token
# (~/.ray/auth_token), and the CLI and jobs read it (RAY_AUTH_MODE=token). Every worker needs
# the same token: copy the head's ~/.ray/auth_token to the worker (RAY_AUTH_TOKEN_PATH=FILE)
# or pass it as RAY_AUTH_TOKEN. The head binds to this node's address (NODE_IP, default the
# first of `hostname -I`: workers must reach it); its dashboard (the job API) stays on
# localhost: reach it from another machine through an SSH tunnel, not an open port.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
RAY=.venv/bin/ray
case "${1:?head|worker|submit|stop}" in
  head)
    ip=${NODE_IP:-$(hostname -I | awk '{print $1}')}
    $RAY start --head --port 6379 --node-ip-address "${ip:?set NODE_IP to an address the workers can reach}" \
      --dashboard-host 127.0.0.1 --dashboard-port 8265 --include-dashboard true ;;
  worker)
    if [[ $RAY_AUTH_MODE == token && -z ${RAY_AUTH_TOKEN:-} && ! -s ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token} ]]; then
      echo "error: no Ray auth token: copy the head's ~/.ray/auth_token here (or set RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN)" >&2
      exit 2
    fi
    $RAY start --address "${HEAD:?head address, e.g. 10.0.0.1:6379}" ;;
  submit)
    shift
    train_yaml=$1; shift
    $RAY job submit --address "${RAY_DASHBOARD:-http://127.0.0.1:8265}" --working-dir . \
      --runtime-env-json '{"excludes": [".venv", "data", "runs", "recs", "reports", "logs", "out", ".git"]}' \
      -- "$PWD/.venv/bin/python" launch/ray_train.py --config "$train_yaml" "$@" ;;
  stop)
    $RAY stop ;;
esac
