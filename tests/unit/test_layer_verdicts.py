"""A layer that cannot exist here skips its dependents (fails under VFIOTEST_STRICT); a layer that
was there and broke fails them, always, with its category: the plugin's two verdicts
(fixtures/layers.py), run in a child pytest so their outcomes are pytest's own."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SUITE = '''
import pytest

from vfiotest.fixtures.layers import layer_failed, layer_unavailable
from vfiotest.podman.client import ContainerError


@pytest.fixture(scope="module")
def absent(request):
    layer_unavailable(request, "kata", "no Kata 1.x here; set VFIOTEST_KATA_BUNDLE")


@pytest.fixture(scope="module")
def broke():
    layer_failed("guest", ContainerError("container c1 did not start on runtime kata-vfio: vfio-hook exited 5"))


def test_needs_absent(absent):
    pass


def test_needs_broken(broke):
    pass


def test_needs_broken_too(broke):
    pass
'''


def run(tmp_path, strict=False):
    (tmp_path / "test_demo.py").write_text(textwrap.dedent(SUITE))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VFIOTEST_"))}
    env["PYTHONPATH"] = os.path.join(ROOT, "lib")
    if strict:
        env["VFIOTEST_STRICT"] = "1"
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return p


def test_a_broken_layer_fails_its_dependents_and_an_absent_one_skips_them(tmp_path):
    p = run(tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out        # a run with a broken layer is not green
    assert "1 skipped, 2 errors" in out, out
    assert "SKIPPED" in out and "kata layer unavailable: no Kata 1.x here; set VFIOTEST_KATA_BUNDLE" in out, out
    assert out.count("guest layer failed (product failure): container c1 did not start") >= 2, out


def test_strict_fails_the_absent_layer_too(tmp_path):
    p = run(tmp_path, strict=True)
    out = p.stdout + p.stderr
    assert "3 errors" in out and "skipped" not in out.splitlines()[-1], out
