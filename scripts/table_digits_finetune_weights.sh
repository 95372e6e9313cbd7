#!/usr/bin/env bash
# Regularizer weight sensitivity, embedded digits fine-tuning (mnist-pretrained CNN -> mnistm, 5 labels
# per class, 3 seeds): each regularizer at 0.1x, 1x and 10x its default weight beside plain fine-tuning
# -> docs/results/digits_finetune_weights/. Run scripts/table_digits_finetune.sh first (pretrained model).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${TLLAB_BIN:-.venv/bin}
source scripts/lib/table_dirs.sh
table_dirs table_digits_finetune_weights "$@"
sweep() {
    $BIN/tllab-sweep launch "$SWEEP" experiment=table_digits_finetune dataset.labels_per_class=5 "$@" \
        || echo "some jobs failed; the report lists them"
}
sweep regularizer=none ${ARGS[@]+"${ARGS[@]}"}
sweep regularizer=l2 regularizer.l2.weight=0.001,0.01,0.1 ${ARGS[@]+"${ARGS[@]}"}
sweep regularizer=l2sp regularizer.l2sp.backbone_weight=0.001,0.01,0.1 ${ARGS[@]+"${ARGS[@]}"}
sweep regularizer=delta regularizer.delta.weight=0.001,0.01,0.1 ${ARGS[@]+"${ARGS[@]}"}
sweep regularizer=bss regularizer.bss.weight=0.0001,0.001,0.01 ${ARGS[@]+"${ARGS[@]}"}
sweep regularizer=lwf regularizer.lwf.weight=0.4,4,40 ${ARGS[@]+"${ARGS[@]}"}
sweep regularizer=co_tuning regularizer.co_tuning.weight=0.23,2.3,23 ${ARGS[@]+"${ARGS[@]}"}
sweep regularizer=bi_tuning regularizer.bi_tuning.weight=0.1,1,10 ${ARGS[@]+"${ARGS[@]}"}
$BIN/tllab-report "$SWEEP" --out "$OUT" --selection last,target_val --baseline fine-tune \
    --note "Regenerate with \`scripts/table_digits_finetune_weights.sh\` (runs only the jobs not done yet, then this report)."
