#!/usr/bin/env bash
# The main job (`make demo`): synthetic identities -> RecordIO -> 2-rank Partial FC training on CPU ->
# verification on held-out identities. Until the training issue lands it runs what exists and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "demo: the end-to-end training demo is not built yet; running the multi-rank smoke check instead"
python -m pytest -q tests/test_harness.py -k allreduce
