#!/bin/sh
# Build the module, then run the benchmark from the repository root:
#   bench/run.sh           speed table
#   bench/run.sh memory    RSS growth check
set -e
cd "$(dirname "$0")/.."
make --no-print-directory build
exec lua5.4 bench/run.lua "$@"
