#!/usr/bin/env bash
# Fine-tuning table, embedded digits (mnist-pretrained CNN -> mnistm, 5 and 20 labels per class;
# 3 seeds) -> docs/results/digits_finetune/. The pretrained model is trained once.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/table_dirs.sh
table_dirs table_digits_finetune "$@"
${TLLAB_BIN:-.venv/bin}/tllab-train experiment=digits_pretrain trainer.quiet=true \
    hydra.run.dir=outputs/pretrained/digits_mnist
# Rows outside the grid join the same sweep dir (command-line values replace the grid's): scratch (random
# init, no regularizer), fine-tuning the whole source model (its head too: the classes are the same), and
# EfficientNet-Lite0 from its ImageNet weights: at 64 px with the backbone at 0.1x the lr (its 150 steps barely
# move the backbone: a frozen-feature probe) and at 128 px with the backbone at the full lr, vs from scratch.
sweep() {
    ${TLLAB_BIN:-.venv/bin}/tllab-sweep launch "$SWEEP" experiment=table_digits_finetune \
        regularizer=none "$@" || echo "some jobs failed; the report lists them"
}
sweep backbone.pretrained=null ${ARGS[@]+"${ARGS[@]}"}
sweep backbone.load_head=true "label='fine-tune (source head)'" ${ARGS[@]+"${ARGS[@]}"}
sweep backbone=efficientnet_lite0 backbone.pretrained=imagenet dataset.image_size=64 \
    "label='efficientnet-lite0 imagenet, 64 px, backbone lr x0.1'" ${ARGS[@]+"${ARGS[@]}"}
sweep backbone=efficientnet_lite0 backbone.pretrained=imagenet dataset.image_size=128 optim.backbone_lr_mult=1.0 \
    "label='efficientnet-lite0 imagenet, 128 px'" ${ARGS[@]+"${ARGS[@]}"}
sweep backbone=efficientnet_lite0 backbone.pretrained=null dataset.image_size=128 optim.backbone_lr_mult=1.0 \
    "label='efficientnet-lite0 scratch, 128 px'" ${ARGS[@]+"${ARGS[@]}"}
exec scripts/table.sh table_digits_finetune last,target_val,oracle --baseline fine-tune "$@"
