#!/usr/bin/env bash
# Fine-tuning table, embedded digits (mnist-pretrained CNN -> mnistm, 5 and 20 labels per class;
# 3 seeds) -> docs/results/digits_finetune/. The pretrained model is trained once.
set -euo pipefail
cd "$(dirname "$0")/.."
${TLLAB_BIN:-.venv/bin}/tllab-train experiment=digits_pretrain trainer.quiet=true \
    hydra.run.dir=outputs/pretrained/digits_mnist
# The scratch row (random init, no regularizer) joins the same sweep dir.
${TLLAB_BIN:-.venv/bin}/tllab-sweep launch outputs/sweeps/table_digits_finetune experiment=table_digits_finetune \
    backbone.pretrained=null regularizer=none "$@" || echo "some scratch jobs failed; the report lists them"
exec scripts/table.sh table_digits_finetune last,target_val,oracle "$@"
