#!/usr/bin/env bash
# Domain adaptation table, embedded digits (mnist -> mnistm, uci; 3 seeds) -> docs/results/digits_da/.
exec "$(dirname "$0")/table.sh" table_digits_da last,source_val,oracle "$@"
