#!/usr/bin/env bash
# Make one paper table: run its sweep preset (finished jobs are skipped, failed ones rerun), then
# write the report (Markdown, CSV, LaTeX, PNG) into docs/results/<table>/.
#   scripts/table.sh <preset> <selection rules> [--metric KEY] [--baseline ROW] [--publish] [tllab-sweep launch options and overrides...]
# --metric and --baseline (a paired comparison of every row with ROW) go to tllab-report, the rest to the sweep.
# Overrides that change the recipe write to outputs/ unless --publish is given (scripts/lib/table_dirs.sh).
#   e.g. scripts/table.sh table_digits_da last,source_val,oracle --jobs 2
#        scripts/table.sh table_visda2017_da last,oracle --metric target_test/acc_per_class_mean
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${TLLAB_BIN:-.venv/bin}
source scripts/lib/table_dirs.sh
preset=$1 selection=$2
shift 2
metric=target_test/acc
report=()
rest=()
while (($#)); do
    case $1 in
        --metric) metric=$2; shift 2 ;;
        --baseline) report+=(--baseline "$2"); shift 2 ;;
        *) rest+=("$1"); shift ;;
    esac
done
table_dirs "$preset" ${rest[@]+"${rest[@]}"}
$BIN/tllab-sweep launch "$SWEEP" "experiment=$preset" ${ARGS[@]+"${ARGS[@]}"} || echo "some jobs failed; the report lists them"
again="scripts/table.sh $preset $selection"
[[ -f scripts/$preset.sh ]] && again="scripts/$preset.sh"
$BIN/tllab-report "$SWEEP" --out "$OUT" --selection "$selection" --metric "$metric" ${report[@]+"${report[@]}"} \
    --note "Regenerate with \`$again\` (runs only the jobs not done yet, then this report)."
