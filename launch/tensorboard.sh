#!/usr/bin/env bash
# Watch runs: bash launch/tensorboard.sh [RUNS_DIR=runs] [PORT=6006]
# On a cluster, forward the port: ssh -L 6006:localhost:6006 login-node
exec tensorboard --logdir "${1:-runs}" --port "${2:-6006}" --bind_all
