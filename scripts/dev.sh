#!/usr/bin/env bash
# Set up the project (virtual env + pinned install) and run something in it.
#   bash scripts/dev.sh demo   # set up if needed, then the whole pipeline on the embedded default
#   bash scripts/dev.sh test   # set up if needed, then ruff (lint + format check) + the test suite (what CI runs)
#   bash scripts/dev.sh setup  # set up only
#   bash scripts/dev.sh setup-img2dataset  # only img2dataset's own env (below)
# img2dataset runs as its own tool from its own env (.venv-img2dataset, pinned: requirements/img2dataset.lock.txt):
# its pins (albumentations 1.x, webdataset 0.2) conflict with the project's webdataset 1.x.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
I2D_VENV=${I2D_VENV:-.venv-img2dataset}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

setup() {
  local stamp="$VENV/.installed-$(cat requirements/lock.txt requirements/dev.txt pyproject.toml | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    echo "== setting up $VENV (pinned: requirements/lock.txt)"
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    # DS_BUILD_OPS=0: DeepSpeed builds its C++ ops lazily (on first use), not at install time.
    DS_BUILD_OPS=0 "$VENV/bin/pip" install -q --disable-pip-version-check \
      -c requirements/lock.txt -r requirements/dev.txt
    "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
    rm -f "$VENV"/.installed-*
    touch "$stamp"
  fi
  setup_img2dataset
}

setup_img2dataset() {
  local stamp="$I2D_VENV/.installed-$(sha256sum <requirements/img2dataset.lock.txt | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    echo "== setting up $I2D_VENV (img2dataset as its own tool; pinned: requirements/img2dataset.lock.txt)"
    [ -x "$I2D_VENV/bin/python" ] || "$PY" -m venv "$I2D_VENV"
    echo '*' >"$I2D_VENV/.gitignore"  # as Python 3.13's venv does: git (and ruff) skip the env
    "$I2D_VENV/bin/pip" install -q --disable-pip-version-check -r requirements/img2dataset.lock.txt
    rm -f "$I2D_VENV"/.installed-*
    touch "$stamp"
  fi
}

system_setup() {
  # System packages for the cluster tests (SLURM, munge, numactl): installed when missing and we are root.
  if [ -x ci/install-system.sh ] || [ -f ci/install-system.sh ]; then
    bash ci/install-system.sh
  fi
}

cmd=${1:-test}
shift || true
case "$cmd" in
  setup) setup ;;
  setup-img2dataset) setup_img2dataset ;;
  demo)
    setup
    exec "$VENV/bin/python" -m jobs.quickstart "$@"
    ;;
  test)
    setup
    system_setup
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    # One ninja (the venv's) for every process, so DeepSpeed's JIT ops are built once and then reused.
    export PATH="$PWD/$VENV/bin:$PATH"
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
    export IMG2DATASET=${IMG2DATASET:-$PWD/$I2D_VENV/bin/img2dataset}  # tests run the tool, never import it
    exec "$VENV/bin/python" -m pytest tests "$@"
    ;;
  *) echo "usage: bash scripts/dev.sh demo|test|setup|setup-img2dataset" >&2; exit 2 ;;
esac
