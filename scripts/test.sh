#!/usr/bin/env bash
# Install, then run the default (fast) test tier. Extra arguments go to pytest, e.g.
# `bash scripts/test.sh -m slow` for the long tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
python -m pytest -q "$@"
