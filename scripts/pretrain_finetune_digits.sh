#!/usr/bin/env bash
# Pretrain the digits CNN on mnist, then fine-tune it on 5 labelled mnistm images per class and
# compare with training from scratch. Extra arguments are passed to every run (e.g. seed=1) and
# name the output folder, so each set of arguments gets its own runs (finished ones are reused).
set -euo pipefail
cd "$(dirname "$0")/.."
train=".venv/bin/tllab-train"
tag=$(printf '%s_' "$@" | tr -c 'A-Za-z0-9.-' '_')
out="outputs/pretrain_finetune_digits/${tag:-default}"
$train experiment=digits_source_only hydra.run.dir="$out/pretrain" "$@"
$train experiment=digits_finetune backbone.pretrained="$out/pretrain/checkpoints/last.pt" \
    hydra.run.dir="$out/finetune" "$@"
$train experiment=digits_finetune hydra.run.dir="$out/scratch" "$@"
for run in finetune scratch; do
    printf '%-9s target_test/acc %s\n' "$run" \
        "$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['final']['target_test/acc'])" "$out/$run/summary.json")"
done
