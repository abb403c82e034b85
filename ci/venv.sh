# Sourced by the ci/ scripts from the checkout's top: the harness's Python, in $py.
# The virtual environment is $VFIOTEST_VENV, default .venv in the checkout; ci/setup makes it.
# A prepared runner keeps it outside the checkout (actions/checkout and GitLab's clean delete
# the checkout's untracked files each job): its vfiotest is an editable install of the checkout
# it was made from, so when that is not this checkout it is pointed here (pip install -e
# --no-deps --no-build-isolation: nothing downloaded, no dependency changed).
# vfiotest_venv returns 1 (with $venv set) when there is no such environment.
vfiotest_venv() {
  local here at
  here=$(pwd -P)
  venv=${VFIOTEST_VENV:-$here/.venv}
  py=$venv/bin/python
  [ -x "$py" ] || return 1
  at=$("$py" -c 'import os, vfiotest; print(os.path.dirname(os.path.dirname(os.path.realpath(vfiotest.__file__))))' \
       2>/dev/null) || at=
  if [ "$at" != "$here/lib" ]; then
    echo "[venv] $venv: its vfiotest is ${at:-not importable}; pointing it at $here (pip install -e, no dependency changed)" >&2
    "$py" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$here" >&2 || {
      echo "[venv] could not point $venv at $here: run ci/setup (VFIOTEST_VENV=$venv ci/setup)" >&2; exit 2; }
  fi
}

# vfiotest_venv or, when there is none, a clear word and exit 2 (naming the caller, $1)
vfiotest_venv_or_exit() {
  vfiotest_venv && return 0
  echo "$1: no virtual environment at $venv: run ci/setup (it makes one there), or set VFIOTEST_VENV to a" \
       "prepared runner's (see docs/fleet.md)" >&2
  exit 2
}
