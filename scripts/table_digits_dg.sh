#!/usr/bin/env bash
# Domain generalization table, embedded digits (leave one of 4 domains out; 3 seeds) -> docs/results/digits_dg/.
exec "$(dirname "$0")/table.sh" table_digits_dg source_val,last,oracle --baseline erm "$@"
