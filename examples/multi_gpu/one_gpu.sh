#!/usr/bin/env bash
# Rehearse a multi-GPU / multi-node job on the ONE GPU you have, before renting the cluster.
#
# RANKS processes, each its own "node" (torchrun --nnodes RANKS --node_rank i on localhost), all on GPU 0, talking
# through gloo (NCCL refuses two ranks on one GPU; gloo runs the same collectives on CUDA tensors). The strategy's
# sharding, the adapter-only checkpoints, a resume on another number of ranks and the export run exactly as on the
# cluster; each rank's peak memory is what each cluster GPU needs for its shard (plus NCCL's buffers there).
# gloo copies through host memory, so steps are slow: check correctness and memory here, not speed.
#
#   examples/multi_gpu/one_gpu.sh                                        # 2 ranks, the FSDP config, 5 steps
#   RANKS=4 CONFIG=configs/llama-qlora-ddp.yaml examples/multi_gpu/one_gpu.sh --trainer.max_steps 10
#   CONFIG=configs/tiny-llama-cpu.yaml STRATEGY=lightning.pytorch.strategies.DDPStrategy examples/multi_gpu/one_gpu.sh
#
# The GPU holds RANKS shards, RANKS sets of activations and RANKS CUDA contexts (~0.5 GiB each); host memory
# holds RANKS copies of whatever each rank loads. Extra arguments go to `lightning-lora fit`.
set -euo pipefail

CONFIG=${CONFIG:-configs/llama-qlora-fsdp.yaml}
RANKS=${RANKS:-2}
STEPS=${STEPS:-5}
PORT=${MASTER_PORT:-29517}
STRATEGY=${STRATEGY:-}               # a strategy class for configs that set none (single-device configs)

cd "$(dirname "$0")/../.."
strategy=()
if [[ -n "$STRATEGY" ]]; then
  strategy=(--trainer.strategy "$STRATEGY")
fi
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT   # one rank failing must not leave the others waiting for it
for ((node = 0; node < RANKS; node++)); do
  CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} torchrun --nnodes "$RANKS" --node_rank "$node" --nproc_per_node 1 \
    --master_addr 127.0.0.1 --master_port "$PORT" \
    -m lightning_lora.cli fit --config "$CONFIG" "${strategy[@]}" \
    --trainer.devices 1 --trainer.num_nodes "$RANKS" --trainer.strategy.process_group_backend gloo \
    --trainer.max_steps "$STEPS" "$@" &
  pids+=($!)
done
for ((done_ranks = 0; done_ranks < RANKS; done_ranks++)); do
  if ! wait -n; then
    echo "one_gpu.sh: a rank failed; stopping the others" >&2
    exit 1
  fi
done
