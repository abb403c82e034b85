"""Which tests report a Kata lane (fixtures/kata.py uses_kata), from the real fixture graph of the
plugin: a user's test that asks only for `container` or `podman_client` runs on kata-vfio, so its
report must not say "host"."""

import os
import subprocess
import sys
import textwrap

USER_TESTS = '''
import pytest

def test_with_container(container):
    pass

def test_with_client(podman_client):
    pass

def test_with_a_group(vfio_group):
    pass

@pytest.mark.kata
def test_marked():
    pass

def test_plain():
    pass
'''

CONFTEST = '''
from vfiotest.fixtures.kata import uses_kata

def pytest_collection_modifyitems(items):
    import os
    for item in items:
        marked = item.get_closest_marker("kata") is not None
        print("LANE", item.name, "kata" if uses_kata(item.fixturenames, marked, os.environ) else "host")
'''


def _lanes(tmp_path, **env):
    (tmp_path / "test_user.py").write_text(textwrap.dedent(USER_TESTS))
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    full = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VFIOTEST_"))}
    full.update(VFIOTEST_STATE_DIR=str(tmp_path / "state"), **env)
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-s", "-p", "no:cacheprovider",
                        "--rootdir", str(tmp_path), str(tmp_path / "test_user.py")],
                       cwd=str(tmp_path), env=full, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return dict(line.split()[1:] for line in p.stdout.splitlines() if line.startswith("LANE "))


def test_a_users_container_test_runs_in_the_kata_lane(tmp_path):
    assert _lanes(tmp_path) == {"test_with_container": "kata", "test_with_client": "kata",
                                "test_with_a_group": "host", "test_marked": "kata", "test_plain": "host"}


def test_another_podman_runtime_is_not_a_kata_lane(tmp_path):
    lanes = _lanes(tmp_path, VFIOTEST_PODMAN_RUNTIME="runc")
    assert lanes["test_with_container"] == "host" and lanes["test_marked"] == "kata"


def _chosen(tmp_path, marker):
    """The test names of USER_TESTS that `-m marker` selects."""
    (tmp_path / "test_user.py").write_text(textwrap.dedent(USER_TESTS))
    full = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VFIOTEST_"))}
    full.update(VFIOTEST_STATE_DIR=str(tmp_path / "state"))
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                        "-m", marker, "--rootdir", str(tmp_path), str(tmp_path / "test_user.py")],
                       cwd=str(tmp_path), env=full, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return sorted(line.split("::")[-1] for line in p.stdout.splitlines() if "::" in line)


def test_the_tests_in_a_kata_lane_carry_the_nested_marker(tmp_path):
    assert _chosen(tmp_path, "nested") == ["test_marked", "test_with_client", "test_with_container"]


def test_the_tests_in_a_kata_lane_boot_the_runner_so_they_are_vm(tmp_path):
    """`-m "not vm"` must not boot the emulated runner: a test whose lane is Kata reaches it at run
    time (podman_client -> kata_runtime), so it is `vm` too, like one that asks for target_host."""
    assert _chosen(tmp_path, "not vm") == ["test_plain"]


def test_the_suites_are_vm_by_their_target_not_statically():
    """With --target local no VM boots for the rebind suite: `-m "not vm"` keeps it; against the
    emulated runner it leaves it out (issue 19: the vm marker is given at run time)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VFIOTEST_", "PYTEST_"))}

    def collected(*args):
        p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                            "suites/rebind", "-m", "not vm", *args], cwd=root, env=env, capture_output=True,
                           text=True, timeout=120)
        return [line for line in p.stdout.splitlines() if "::" in line]

    assert collected("--target", "local") and all("suites/rebind" in t for t in collected("--target", "local"))
    assert collected("--target", "virtual") == []
