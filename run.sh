#!/usr/bin/env bash
# The two commands of the README:  ./run.sh demo [options]   ·   ./run.sh test [pytest args]
# Each creates the project's virtual environment (.venv) on first use.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
stamp="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c "import ensurepip" 2>/dev/null; then
    echo "python3 with venv is needed (Debian: apt-get install -y python3-venv)" >&2; exit 2
  fi
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e ".[test]"
  rm -f "$VENV"/.installed-* && touch "$stamp"
fi
cmd="${1:-}"; shift || true
case "$cmd" in
  demo) exec "$VENV/bin/iotjx" demo "$@" ;;
  # three pytest-xdist workers (each with its own template database and broker: tests mostly wait on
  # PostgreSQL, the broker and sockets); IOTJX_TEST_WORKERS=0 or `-n 0` for one process
  test) exec "$VENV/bin/python" -m pytest -n "${IOTJX_TEST_WORKERS:-3}" "$@" ;;
  iotjx) exec "$VENV/bin/iotjx" "$@" ;;
  *) echo "usage: ./run.sh demo [--duration S] | ./run.sh test [pytest args] | ./run.sh iotjx …" >&2; exit 2 ;;
esac
