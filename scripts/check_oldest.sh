#!/usr/bin/env bash
# The test suite on the oldest releases we support (requirements-oldest.txt: what GPU images ship, which
# lag PyPI), in a virtual environment of its own, so the lower bounds in requirements.txt stay true.
#
#   scripts/check_oldest.sh                      # python -m pytest -q tests
#   scripts/check_oldest.sh -x --durations=20    # arguments go to pytest (tests/ unless paths are given)
#
# MILAN_OLDEST_VENV: where the environment lives (default ${XDG_CACHE_HOME:-~/.cache}/milan/venv-oldest).
# It is built on first use (torch's CUDA wheels: about 5 GB, a few minutes), rebuilt when the Python
# interpreter (PYTHON, default python3) changes, and updated by pip when requirements*.txt change.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${MILAN_OLDEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/milan/venv-oldest}
python=${PYTHON:-python3}

if [[ ! -x $venv/bin/python || "$(cat "$venv/.milan-python" 2>/dev/null)" != "$("$python" -VV)" ]]; then
  if [[ -e $venv && ! -f $venv/pyvenv.cfg && -n "$(ls -A "$venv" 2>/dev/null || echo file)" ]]; then
    echo "error: $venv exists and is not a virtual environment; set MILAN_OLDEST_VENV to another folder" >&2
    exit 2
  fi
  echo "building $venv with the oldest supported releases" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$python" -VV > "$venv/.milan-python"
fi
# After a change to the requirements, pip brings the existing environment in line (fast when nothing moved).
stamp=$(cat requirements.txt requirements-dev.txt requirements-oldest.txt | sha256sum)
if [[ "$(cat "$venv/.milan-requirements" 2>/dev/null)" != "$stamp" ]]; then
  # -c pins every package the requirements name to its lowest supported release.
  "$venv/bin/python" -m pip install -q -c requirements-oldest.txt -r requirements-dev.txt
  "$venv/bin/python" -m pip check
  echo "$stamp" > "$venv/.milan-requirements"
fi
"$venv/bin/python" -c 'import torch, torchvision, timm; print("oldest stack: torch", torch.__version__,
      "torchvision", torchvision.__version__, "timm", timm.__version__, flush=True)'
# pytest.ini's testpaths supplies tests/ when the arguments name no path.
exec "$venv/bin/python" -m pytest -q "${@:-tests}"
