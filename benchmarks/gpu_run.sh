#!/usr/bin/env bash
# What to run when a GPU is lent (device tool): versions, the CUDA tests, the GPU presets, a profile.
# Usage: bash benchmarks/gpu_run.sh OUTDIR [tests|0.85b|ablation|6.7b|offload|paired|infer_compile|cpu-host|profile|qlora ...]
#        (default: tests 0.85b 6.7b profile)
set -u
out=${1:?OUTDIR}; shift
steps=${*:-tests 0.85b 6.7b profile}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
git log -1 --format='commit %h %s' 2>/dev/null || true
for s in $steps; do
  echo "######## $s  $(date -u +%T)"
  case $s in
    tests) python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py tests/test_lora_blocks.py tests/test_kernels_lora.py tests/test_compile_blocks.py > "$out/tests.txt" 2>&1; grep -E "^(FAILED|ERROR|E  )|passed|failed" "$out/tests.txt" | head -20 ;;
    0.85b) timeout 420 python3 -m slimtune.bench --preset gpu-0.85b --rounds 2 --out "$out/gpu-0.85b.json" ;;
    ablation) timeout 300 python3 -m slimtune.bench --preset gpu-0.85b --rounds 2 --out "$out/ablation3-gpu-0.85b.json" \
                --scenarios frozen,frozen_compile,frozen_compile_graphs,peft_bf16_compile,slimtune_compile,slimtune_compile_graphs,slimtune_compile_perlayer ;;
    offload) timeout 300 python3 -m slimtune.bench --preset gpu-6.7b --rounds 1 --out "$out/offload-gpu-6.7b.json" \
                --scenarios frozen,slimtune,slimtune_offload ;;
    paired) timeout 300 python3 -m slimtune.bench --preset gpu-0.85b --pairs 30 --out "$out/paired-gpu-0.85b.json" \
                --scenarios paired,paired_peft,paired_infer,paired_infer_peft ;;
    infer_compile) timeout 300 python3 -m slimtune.bench --preset gpu-6.7b --rounds 2 --out "$out/infer-compile-gpu-6.7b.json" \
                --scenarios infer,infer_compile ;;
    cpu-host) # the CPU preset's paired estimate on 2 cores of this machine's host CPU (another ISA than the VM's)
             grep -m1 "model name" /proc/cpuinfo; grep -o -m1 -E "avx512f|amx_tile" /proc/cpuinfo | sort -u | tr '\n' ' '; echo
             CUDA_VISIBLE_DEVICES= timeout 400 taskset -c 0,1 python3 -m slimtune.bench --preset cpu --pairs 24 \
                --scenarios paired,paired_peft,paired_infer --out "$out/cpu-host-paired.json" ;;
    6.7b) timeout 420 python3 -m slimtune.bench --preset gpu-6.7b --rounds 1 --out "$out/gpu-6.7b.json" ;;
    qlora) # QLoRA on the GPU: its CUDA test, then LoRA (bf16 base) vs slimtune QLoRA NF4 vs PEFT QLoRA (bf16 compute)
           python3 -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)"
           timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_qlora.py -k cuda > "$out/qlora-tests.txt" 2>&1; tail -3 "$out/qlora-tests.txt"
           timeout 300 python3 -m slimtune.bench.qlora --part shape --preset gpu-0.85b --rounds 2 --out "$out/qlora-gpu-0.85b"
           timeout 420 python3 -m slimtune.bench.qlora --part shape --preset gpu-6.7b --rounds 1 --steps 5 --out "$out/qlora-gpu-6.7b" ;;
    profile) python3 benchmarks/profile_gpu.py gpu-0.85b frozen,slimtune,infer:base,infer:slimtune_merged,infer:slimtune > "$out/profile-gpu-0.85b.txt" 2>&1
             grep -E "^====|time total" "$out/profile-gpu-0.85b.txt" ;;
  esac
done
echo "######## done $(date -u +%T)"
