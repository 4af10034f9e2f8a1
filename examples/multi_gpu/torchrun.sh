#!/usr/bin/env bash
# Multi-GPU QLoRA launched with torchrun: one process per GPU, on one node or several.
#
#   examples/multi_gpu/torchrun.sh                          # all GPUs of this node, DDP config
#   CONFIG=configs/llama-qlora-fsdp.yaml examples/multi_gpu/torchrun.sh
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 examples/multi_gpu/torchrun.sh   # then NODE_RANK=1 on node1
#
# Lightning sees torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE) and joins that process group instead
# of starting its own processes, so trainer.devices / num_nodes must match what torchrun starts.
# (Without torchrun, `lightning-lora fit --config configs/llama-qlora-ddp.yaml` starts the processes itself.)
set -euo pipefail

CONFIG=${CONFIG:-configs/llama-qlora-ddp.yaml}
NPROC=${NPROC:-$(nvidia-smi --list-gpus | wc -l)}   # processes (= GPUs) on this node
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

cd "$(dirname "$0")/../.."
exec torchrun \
  --nproc_per_node "$NPROC" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m lightning_lora.cli fit --config "$CONFIG" \
  --trainer.devices "$NPROC" --trainer.num_nodes "$NNODES" "$@"
