#!/usr/bin/env bash
# Domain adaptation table, embedded digits (mnist -> mnistm, uci; 3 seeds) -> docs/results/digits_da/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/table_dirs.sh
table_dirs table_digits_da "$@"
# Rows outside the grid join the same sweep dir: AFN's bottleneck and head without its loss (an ablation),
# and AFN with one forward pass per domain, as tllib's afn.py (the grid's rows share one joint pass).
${TLLAB_BIN:-.venv/bin}/tllab-sweep launch "$SWEEP" experiment=table_digits_da \
    norm=afn norm.afn.weight=0 "label='afn head, no AFN loss'" ${ARGS[@]+"${ARGS[@]}"} || echo "some jobs failed; the report lists them"
${TLLAB_BIN:-.venv/bin}/tllab-sweep launch "$SWEEP" experiment=table_digits_da \
    norm=afn trainer.forward=separate "label='afn, separate passes'" ${ARGS[@]+"${ARGS[@]}"} || echo "some jobs failed; the report lists them"
# Domain-alignment rows (tllab/align): CDAN with its randomized map, the full one is 20480 wide on this CNN.
${TLLAB_BIN:-.venv/bin}/tllab-sweep launch "$SWEEP" experiment=table_digits_da norm=none align=dann \
    ${ARGS[@]+"${ARGS[@]}"} || echo "some jobs failed; the report lists them"
${TLLAB_BIN:-.venv/bin}/tllab-sweep launch "$SWEEP" experiment=table_digits_da norm=none align=cdan \
    align.cdan.randomized=true ${ARGS[@]+"${ARGS[@]}"} || echo "some jobs failed; the report lists them"
exec scripts/table.sh table_digits_da last,source_val,oracle "$@"
