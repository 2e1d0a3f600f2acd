#!/usr/bin/env bash
# Installs learn2learn 0.2.0 (the drop-in tests' oracle) into the active environment without letting
# pip touch torch: every install is --no-deps. Its released C sources do not build on Python >= 3.11,
# so the .pyx files are regenerated with Cython 0.29 first.
set -euo pipefail
PY=${PY:-python}
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # survives the cd below
if $PY -c "import learn2learn" 2>/dev/null; then exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$PY -m pip install -q --no-deps requests==2.34.2 urllib3==2.8.0 idna==3.20 certifi==2026.10.19.post1 \
    charset-normalizer==3.5.3 gym==0.26.2 scipy==1.17.1 higher==0.2.1
$PY -m pip install -q --no-deps --target "$work/cython" cython==0.29.37
$PY -m pip download -q --no-deps --no-binary :all: learn2learn==0.2.0 -d "$work"
cd "$work" && tar xzf learn2learn-0.2.0.tar.gz && cd learn2learn-0.2.0 && rm -rf tests
PYTHONPATH="$work/cython" $PY -m cython -3 learn2learn/data/meta_dataset.pyx learn2learn/data/task_dataset.pyx \
    learn2learn/data/transforms.pyx
$PY -m pip install -q --no-deps --no-build-isolation .
cd / && $PY -c "import learn2learn; print('learn2learn', learn2learn.__version__)"
