"""A small pytest session with Allure results, for the report tests: a suite tree of its own
(suites/demo_bind, suites/demo_env) run in a child process against a simulated sysfs (no VM),
with fixtures that have finalizers, a VF bound through the vfio layer, steps, an attachment, a
product failure and an environment skip."""

import os
import subprocess
import sys
import textwrap

from vfiotest.testing.simsysfs import SimulatedHost

BIND_SUITE = '''
"""Demo: a VF bound to vfio-pci, and a check that fails."""
import allure
import pytest


@pytest.fixture
def with_finalizer(request):
    def close_it():
        pass
    request.addfinalizer(close_it)
    yield 1


@pytest.fixture(scope="module")
def module_resource():
    yield 2


def test_bound_group(vfio_group, with_finalizer, module_resource):
    with allure.step("read the group's device node"):
        allure.attach("group " + vfio_group.group, name="group node note",
                      attachment_type=allure.attachment_type.TEXT)
    assert vfio_group.group


def test_product_check_fails(with_finalizer):
    assert 1 + 1 == 3, "the VF kept its old driver"
'''

ENV_SUITE = '''
"""Demo: a layer the session could not provision."""
import pytest


def test_needs_a_layer(with_finalizer_env):
    pytest.skip("kata layer unavailable: no Kata 1.x bundle")


@pytest.fixture
def with_finalizer_env():
    yield 3
'''


def run_session(tmp_path, name="run", env=None, timeout=240, args=()):
    """Run the demo suites in tmp_path/name; returns (completed process, alluredir, junit path)."""
    root = tmp_path / name
    for suite, text in (("demo_bind", BIND_SUITE), ("demo_env", ENV_SUITE)):
        d = root / "suites" / suite
        d.mkdir(parents=True)
        (d / f"test_{suite}.py").write_text(textwrap.dedent(text))
    sim = SimulatedHost.build(str(root / "sim"), pfs=[{"preset": "igb", "numvfs": 0}])
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("PYTEST_", "VFIOTEST_", "GITHUB_", "GITLAB_", "CI_"))}
    full_env.pop("CI", None)
    full_env.update(VFIOTEST_STATE_DIR=str(root / "state"), **(env or {}))
    reports = root / "reports"
    alluredir, junit = reports / "allure-results", reports / "junit.xml"
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--rootdir", str(root),
                        "--target", f"sim:{sim.sysroot}", "--vfio-profile", "emulated", f"--junitxml={junit}",
                        f"--alluredir={alluredir}", *args, "suites"],
                       cwd=str(root), env=full_env, capture_output=True, text=True, timeout=timeout)
    return p, alluredir, junit
