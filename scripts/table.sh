#!/usr/bin/env bash
# Make one paper table: run its sweep preset (finished jobs are skipped, failed ones rerun), then
# write the report (Markdown, CSV, LaTeX, PNG) into docs/results/<table>/.
#   scripts/table.sh <preset> <selection rules> [tllab-sweep launch options and overrides...]
#   e.g. scripts/table.sh table_digits_da last,source_val,oracle --jobs 2
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${TLLAB_BIN:-.venv/bin}
preset=$1 selection=$2
shift 2
sweep=outputs/sweeps/$preset
$BIN/tllab-sweep launch "$sweep" "experiment=$preset" "$@" || echo "some jobs failed; the report lists them"
$BIN/tllab-report "$sweep" --out "docs/results/${preset#table_}" --selection "$selection" \
    --note "Regenerate with \`scripts/$preset.sh\` (runs only the jobs not done yet, then this report)."
