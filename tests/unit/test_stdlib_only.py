"""bind.py (and what it imports) must load without site-packages: the Kata guest hook ships it."""

import os
import subprocess
import sys

LIB = os.path.join(os.path.dirname(__file__), "..", "..", "lib")


def test_bind_imports_with_stdlib_only():
    code = ("import sys; sys.path.insert(0, %r); import vfiotest.bind, vfiotest.profiles, vfiotest.host;"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('filelock', 'paramiko', 'pytest', 'tomlkit')];"
            "assert not bad, bad" % os.path.abspath(LIB))
    res = subprocess.run([sys.executable, "-S", "-I", "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
