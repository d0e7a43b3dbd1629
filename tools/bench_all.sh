#!/usr/bin/env bash
# `make bench`: the standard benchmark table (figures go to docs/benchmarks.md by hand, with the date).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "bench: no benchmarks yet"
