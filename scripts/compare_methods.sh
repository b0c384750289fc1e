#!/usr/bin/env bash
# Train every method on one example config and print trainable %, wall time and the held-out
# metric before -> after. Usage: scripts/compare_methods.sh CONFIG OUTDIR [extra key=value ...]
# METHODS="lora ia3" runs a subset; LRS="full=1e-4 prompt=3e-2" sets a learning rate per method
# (one lr rarely suits full fine-tuning and a 20-token prompt alike).
set -u
cfg=$1; out=$2; shift 2
declare -A extra=(
  [heads]="method.heads=[0,1]"
  [layerwise]="method.last_n=2"
  [bottleneck]="method.adapter_type=houlsby"
  [prefix]="method.num_virtual_tokens=20 method.init_weights=zero"
  [prompt]="method.num_virtual_tokens=20"
  [p_tuning]="method.num_virtual_tokens=20"
)
declare -A lrs=()
for kv in ${LRS:-}; do lrs[${kv%%=*}]="train.lr=${kv#*=}"; done
methods=${METHODS:-"lora dora ia3 bottleneck prefix prompt p_tuning bitfit layerwise sparse heads singular full"}
for m in $methods; do
  start=$(date +%s.%N)
  log="$out/$m.log"
  mkdir -p "$out"
  slimtune train "$cfg" --no-progress method.name=$m ${extra[$m]:-} ${lrs[$m]:-} output_dir="$out/$m" "$@" > "$log" 2>&1
  rc=$?
  secs=$(echo "$(date +%s.%N) - $start" | bc)
  pct=$(grep -o "trainable%: [0-9.]*" "$log" | tail -1 | cut -d' ' -f2)
  res=$(grep "held-out" "$log" | tail -1)
  printf "%s\trc=%s\t%.0f s\ttrainable%%=%s\t%s\n" "$m" "$rc" "$secs" "${pct:-n/a}" "${res:-$(grep -iE 'error' "$log" | tail -1 | cut -c1-160)}"
done
