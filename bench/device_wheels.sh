#!/usr/bin/env bash
# The offline wheel set for the GPU machine (it has no network): the pins of bench/device_wheels.txt,
# as wheels for CPython 3.12 on x86-64 Linux, into .device_wheels/ (git-ignored; carry it with the
# call). --prove then installs them with --no-index into a clean Python 3.12 venv and imports each.
#
#   bash bench/device_wheels.sh            # download
#   bash bench/device_wheels.sh --prove    # download, then prove the offline install
#
# PY312: a python3.12 for the proof (default: python3.12 on PATH, else pyenv's). Without one the
# proof falls back to checking each wheel's tags against cp312 / manylinux x86_64 and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.device_wheels
LIST=bench/device_wheels.txt
PIP=${PIP:-python3 -m pip}
mkdir -p "$DIR"
$PIP download -q --disable-pip-version-check --only-binary=:all: --no-deps \
  --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$DIR" -r "$LIST"
echo "wheels in $DIR:"; ls -1 "$DIR"
[ "${1:-}" = "--prove" ] || exit 0

is312() { [ -n "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }
if [ -z "${PY312:-}" ]; then
  for c in "$(command -v python3.12 || true)" "$HOME"/.pyenv/versions/3.12*/bin/python3.12 \
           "$(command -v uv >/dev/null && uv python find 3.12 2>/dev/null || true)"; do
    if is312 "$c"; then PY312=$c; break; fi
  done
fi
names=$(grep -Ev '^\s*(#|$)' "$LIST" | sed 's/==.*//')
if is312 "${PY312:-}"; then
  echo "proving the offline install with $PY312"
  venv=$(mktemp -d /tmp/device_wheels_venv.XXXXXX)
  "$PY312" -m venv "$venv"
  # shellcheck disable=SC2086
  PIP_CONFIG_FILE=/dev/null "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-index \
    --find-links "$DIR" $names
  "$venv/bin/python" - <<'PY'
import importlib, sys
for m in ("pytest", "pygments", "pluggy", "iniconfig", "packaging", "pytest_timeout", "xdist", "execnet", "ninja"):
    mod = importlib.import_module(m)
    print(f"  {m} {getattr(mod, '__version__', '')}")
import subprocess
subprocess.run([sys.executable, "-m", "pytest", "--version"], check=True)
subprocess.run([sys.executable, "-c", "import ninja, subprocess; subprocess.run([ninja.BIN_DIR + '/ninja', '--version'], check=True)"], check=True)
print(f"offline install into a clean venv of Python {sys.version.split()[0]}: OK")
PY
  rm -rf "$venv"
else
  echo "no Python 3.12 here: checking the wheels' tags instead of installing"
  for w in "$DIR"/*.whl; do
    tags=$(basename "$w" .whl | cut -d- -f3-)
    case "$tags" in
      py3-none-any|cp312-cp312-*x86_64*|py3-none-*manylinux*x86_64*|cp312-abi3-*x86_64*) echo "  ok  $tags";;
      *) echo "  BAD $tags ($w)"; exit 1;;
    esac
  done
fi
