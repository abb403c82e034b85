"""No Kata 1.x and no bundle: the Kata layers (kata_install and everything above it) are
unavailable, once, with the reason and the fix (VFIOTEST_KATA_BUNDLE; the bundle's README and
build.sh); `--strict` fails them instead. Runs pytest in a child process with the plugin; the
target is this machine (only `command -v kata-runtime` is run there), the default bundle path
is pointed at nothing by the child's conftest (../shared is not touched)."""

import os
import subprocess
import sys
import textwrap

import pytest

from vfiotest.kata import bundle

CONFTEST = '''
import os

import pytest

from vfiotest.host import LocalHost
from vfiotest.kata import bundle

HERE = os.path.dirname(__file__)
bundle.DEFAULT_BUNDLE = os.path.join(HERE, "absent", bundle.BUNDLE_NAME)   # no default bundle
_choose = bundle.choose_kata


def counted(*args, **kw):
    with open(os.path.join(HERE, "choose_kata.calls"), "a") as f:
        f.write("call\\n")
    return _choose(*args, **kw)


bundle.choose_kata = counted


@pytest.fixture(scope="session")
def target_host():
    return LocalHost()


@pytest.fixture(scope="session")
def target_spec():
    return "local"
'''

USER_TESTS = '''
def test_install(kata_install):
    pass


def test_runtime(kata_runtime):
    pass


def test_image(guest_image):
    pass


def test_plain():
    pass
'''


def run_child(tmp_path, *args, env=None):
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp_path / "test_user.py").write_text(textwrap.dedent(USER_TESTS))
    full = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VFIOTEST_"))}
    # no kata-runtime on the PATH the local target's commands see (this machine has none installed)
    full.update(VFIOTEST_STATE_DIR=str(tmp_path / "state"), PATH="/usr/sbin:/usr/bin:/sbin:/bin", **(env or {}))
    assert subprocess.run(["sh", "-c", "command -v kata-runtime"], env=full).returncode != 0, \
        "this machine has a kata-runtime on the PATH: the test needs a target without Kata"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider", "-p", "no:randomly",
                           "--rootdir", str(tmp_path), *args, str(tmp_path / "test_user.py")],
                          cwd=str(tmp_path), env=full, capture_output=True, text=True, timeout=180)


def calls(tmp_path):
    p = tmp_path / "choose_kata.calls"
    return len(p.read_text().splitlines()) if p.exists() else 0


BUILD_HINT = f"{os.path.dirname(bundle.BUILD_SCRIPT)}/README.md says how {bundle.BUILD_SCRIPT} builds one"


@pytest.mark.parametrize("case", ["unset", "names-nothing"])
def test_without_a_bundle_the_kata_layers_skip_once_with_the_reason_and_the_fix(tmp_path, case):
    env = {} if case == "unset" else {bundle.BUNDLE_ENV: str(tmp_path / "no-such-bundle.tar.zst")}
    p = run_child(tmp_path, env=env)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "1 passed, 3 skipped" in out, out
    skips = [line for line in p.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skips) == 3, out
    reasons = {line.split(": ", 1)[1] for line in skips}
    assert len(reasons) == 1, reasons           # one reason, the same for every layer above kata_install
    reason = reasons.pop()
    assert reason.startswith("kata layer unavailable: "), reason
    if case == "unset":
        assert f"{bundle.BUNDLE_ENV} unset" in reason and "absent" in reason, reason
        assert f"Set {bundle.BUNDLE_ENV} to a Kata 1.x bundle" in reason and BUILD_HINT in reason, reason
        assert calls(tmp_path) == 1             # the Kata was looked for once, for the whole session
    else:
        assert f"{bundle.BUNDLE_ENV}={tmp_path / 'no-such-bundle.tar.zst'} names nothing" in reason, reason
        assert bundle.BUILD_SCRIPT in reason, reason


def test_without_a_bundle_strict_fails_the_kata_layers(tmp_path):
    p = run_child(tmp_path, "--strict")
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    assert "1 passed, 3 errors" in out, out          # failed in setup: the layer, not the test
    assert out.count("kata layer unavailable: no Kata 1.x for the Kata layers") >= 3, out
