#!/usr/bin/env bash
# Replaced by `slimtune compare` (docs/search.md): the same data, split, steps and seed for every
# method, each method's learning rate probed on the validation split, the final numbers measured
# once on a held-out test split, compare.md / compare.csv / compare.png. This wrapper keeps the old
# calling convention:  scripts/compare_methods.sh CONFIG OUTDIR [key=value ...]
#   METHODS="lora ia3"              -> --methods lora,ia3          (default: all)
#   LRS="full=1e-4 prompt=3e-2"     -> --lr full=1e-4,prompt=3e-2  (no probe for those methods)
# Any other slimtune compare option can follow the overrides (e.g. --steps 30).
set -euo pipefail
cfg=$1; out=$2; shift 2
args=(compare "$cfg" --out "$out")
[ -n "${METHODS:-}" ] && args+=(--methods "$(echo $METHODS | tr ' ' ',')")
[ -n "${LRS:-}" ] && args+=(--lr "$(echo $LRS | tr ' ' ',')")
exec "${SLIMTUNE:-slimtune}" "${args[@]}" "$@"
