#!/usr/bin/env bash
# Install, then run the quickstart recipe offline on the tiny zoo (NPO on forget10).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unlearn run recipes/quickstart.yaml --set output.overwrite=true "$@"
