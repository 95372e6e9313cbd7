#!/usr/bin/env bash
# Domain adaptation table, embedded digits (mnist -> mnistm, uci; 3 seeds) -> docs/results/digits_da/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/table_dirs.sh
table_dirs table_digits_da "$@"
# Rows outside the grid join the same sweep dir (command-line values replace the grid's).
sweep() {
    ${TLLAB_BIN:-.venv/bin}/tllab-sweep launch "$SWEEP" experiment=table_digits_da "$@" ${ARGS[@]+"${ARGS[@]}"} \
        || echo "some jobs failed; the report lists them"
}
# AFN's bottleneck and head without its loss (an ablation), and AFN with one forward pass per domain, as
# tllib's afn.py (the grid's rows share one joint pass).
sweep norm=afn norm.afn.weight=0 "label='afn head, no AFN loss'"
sweep norm=afn trainer.forward=separate "label='afn, separate passes'"
# Domain-alignment rows (tllab/align), each with its YAML's defaults (tllib's); CDAN with its randomized map,
# the full one is 20480 wide on this CNN.
sweep norm=none align=dann
sweep norm=none align=cdan align.cdan.randomized=true
for method in dan jan mcc mdd mcd; do
    sweep norm=none align=$method
done
exec scripts/table.sh table_digits_da last,source_val,oracle --baseline "source only" "$@"
