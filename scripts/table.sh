#!/usr/bin/env bash
# Make one paper table: run its sweep preset (finished jobs are skipped, failed ones rerun), then
# write the report (Markdown, CSV, LaTeX, PNG) into docs/results/<table>/.
#   scripts/table.sh <preset> <selection rules> [--metric KEY] [tllab-sweep launch options and overrides...]
#   e.g. scripts/table.sh table_digits_da last,source_val,oracle --jobs 2
#        scripts/table.sh table_visda2017_da last,oracle --metric target_test/acc_per_class_mean
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${TLLAB_BIN:-.venv/bin}
preset=$1 selection=$2
shift 2
metric=target_test/acc
args=()
while (($#)); do
    if [[ $1 == --metric ]]; then metric=$2; shift 2; else args+=("$1"); shift; fi
done
sweep=outputs/sweeps/$preset
$BIN/tllab-sweep launch "$sweep" "experiment=$preset" ${args[@]+"${args[@]}"} || echo "some jobs failed; the report lists them"
again="scripts/table.sh $preset $selection"
[[ -f scripts/$preset.sh ]] && again="scripts/$preset.sh"
$BIN/tllab-report "$sweep" --out "docs/results/${preset#table_}" --selection "$selection" --metric "$metric" \
    --note "Regenerate with \`$again\` (runs only the jobs not done yet, then this report)."
