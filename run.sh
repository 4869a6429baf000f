#!/usr/bin/env bash
# One command from a fresh clone:
#   ./run.sh demo [ARGS...]   set up .venv on first use, then: python main_clip.py -d demo ARGS...
#   ./run.sh test [ARGS...]   set up .venv on first use, then: python -m pytest -q ARGS...
# Setup is Python's own venv and pip: `python3 -m venv .venv` and
# `pip install --isolated -r requirements.txt` (--isolated: ignore machine-wide pip configuration).
# It runs again when the last one did not finish or requirements.txt changed. VLPL_VENV=DIR puts
# the environment elsewhere (CI keeps one per requirements.txt outside the clone).
set -euo pipefail
cd "$(dirname "$0")"

usage="usage: ./run.sh demo|test [extra arguments for main_clip.py or pytest]"
if [ $# -lt 1 ]; then
    echo "$usage" >&2
    exit 2
fi
target=$1
shift

venv=${VLPL_VENV:-.venv}
marker="$venv/.vlpl-setup-complete"   # holds the sha256 of the requirements.txt it installed

setup() {
    local wanted
    wanted=$(sha256sum requirements.txt | cut -d' ' -f1)
    if [ -f "$marker" ] && [ "$(cat "$marker")" = "$wanted" ] && "$venv/bin/python" -c "" 2>/dev/null; then
        return
    fi
    echo "run.sh: setting up $venv (python3 -m venv, pip install --isolated -r requirements.txt); this happens once" >&2
    rm -f "$marker"
    if ! "$venv/bin/python" -c "" 2>/dev/null; then
        python3 -m venv --clear "$venv"
    fi
    "$venv/bin/python" -m pip install --isolated -r requirements.txt
    echo "$wanted" > "$marker"
}

case "$target" in
    demo)
        setup
        exec "$venv/bin/python" main_clip.py -d demo "$@"
        ;;
    test)
        setup
        exec "$venv/bin/python" -m pytest -q "$@"
        ;;
    *)
        echo "run.sh: unknown target '$target'; $usage" >&2
        exit 2
        ;;
esac
