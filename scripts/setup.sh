#!/usr/bin/env bash
# Sets up .venv with everything snapguard needs, then runs what it is asked to:
#   bash scripts/setup.sh demo   -> sets up, then runs the main job: `snapguard chaos run`
#   bash scripts/setup.sh test   -> sets up, then runs the whole test suite
#   bash scripts/setup.sh        -> sets up only
# Torch: installs torch==2.13.0 (the CPU build this project tests with) only when there is no
# torch at all; a torch that is already there is never touched. A torch installed for the Python
# that creates .venv (a CUDA build, say) is used as it is: .venv then sees that Python's packages.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${SNAPGUARD_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || {
    echo "[setup] snapguard needs Python 3.11 or newer; $PY is $("$PY" --version 2>&1) (set PYTHON=...)" >&2; exit 2; }

if [ ! -x "$VENV/bin/python" ]; then
    if "$PY" -c "import torch" >/dev/null 2>&1; then
        echo "[setup] creating $VENV with $($PY --version), which has torch: .venv uses it and its other packages"
        "$PY" -m venv --system-site-packages "$VENV"
    else
        echo "[setup] creating $VENV with $($PY --version)"
        "$PY" -m venv "$VENV"
    fi
fi
VPY="$VENV/bin/python"
stamp="$VENV/.snapguard-setup"
want=$(cat pyproject.toml scripts/setup.sh snapguard/_stream.c | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
        echo "[setup] no torch found: installing torch==2.13.0 (CPU build)"
        "$VPY" -m pip install -q "torch==2.13.0"
    else
        echo "[setup] keeping torch $("$VPY" -W ignore -c 'import torch; print(torch.__version__)')"
    fi
    # Pin whatever torch is installed, so no resolver swaps it for another build.
    cons="$VENV/constraints.txt"
    # (-W ignore: torch warns that NumPy is missing, which is only installed next)
    "$VPY" -W ignore -c "import torch; print('torch==' + torch.__version__)" > "$cons"
    echo "[setup] installing snapguard and its dependencies"
    DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1 "$VPY" -m pip install -q -c "$cons" -e ".[all,test]"
    echo "$want" > "$stamp"
fi

# Byte-compile the project's own modules (quick when nothing changed): the tests and the demo start hundreds of
# Python processes that import them, and where PYTHONDONTWRITEBYTECODE is set, none would keep what it compiled.
"$VPY" -m compileall -q -j 0 snapguard daemon integrations chaos tests examples >/dev/null || true

case "${1:-}" in
    demo) shift; exec "$VENV/bin/snapguard" chaos run "$@" ;;
    test) shift
        [ $# -eq 0 ] || exec "$VPY" -m pytest "$@"
        # The whole suite, in two parts. First the tests that run whole jobs of many processes (chaos, training,
        # the frameworks), whose waits are minutes long: two at a time, side by side. Then the rest, many of them
        # with waits of seconds, one at a time, so that no other test's load stretches those.
        heavy=(tests/test_chaos.py tests/test_training.py tests/test_integrations_deepspeed.py
              tests/test_integrations_torch.py tests/test_integrations_megatron.py)
        rc=0
        "$VPY" -m pytest -n 2 --dist loadfile "${heavy[@]}" || rc=$?
        [ "$rc" -ne 2 ] || exit 2  # interrupted (Ctrl-C): not the second part either
        "$VPY" -m pytest "${heavy[@]/#/--ignore=}" || rc=$((rc ? rc : $?))
        exit "$rc" ;;
    "") echo "[setup] ready: $VENV" ;;
    *) echo "usage: bash scripts/setup.sh [demo|test] [args...]" >&2; exit 2 ;;
esac
