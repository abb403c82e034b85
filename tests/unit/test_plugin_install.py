"""The harness as an installed pytest plugin: `pip install` of the project gives a `pytest11`
entry point, and a test tree outside the repository (no conftest, no path set-up) gets the
options and the fixture layers from it. Nothing is reached: the user's tests are collected only."""

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

USER_SUITE = '''
"""A user's own suite in another repository."""
import pytest


@pytest.mark.vm
def test_my_nic_in_a_kata_guest(vfio_group, container):
    assert vfio_group.dev_path.startswith("/dev/vfio/")


def test_my_nic_again(vfio_group):     # no marker: the plugin marks it, it reaches the emulated runner
    assert vfio_group.group


def test_my_options(request):
    assert request.config.getoption("--target") == "virtual"
'''


def _install(tmp_path):
    """Install a copy of the project's sources (what an sdist holds) into a fresh venv with pip;
    the venv sees the harness's dependencies through a .pth, not the editable checkout."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for d in ("lib", "fixtures"):
        shutil.copytree(os.path.join(ROOT, d), src / d,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # the dependencies (pytest, paramiko, ...) from the harness's own environment; .pth files
    # of that environment (the editable checkout) are not processed from here
    with open(os.path.join(purelib, "harness-deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: pip must not uninstall the editable checkout it runs from
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--ignore-installed",
                        "--disable-pip-version-check", "--no-warn-script-location", "--prefix", str(venv), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return py


def _clean_env():
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("VFIOTEST_", "PYTEST_", "PYTHONPATH"))}


def test_installed_plugin_serves_a_suite_outside_the_repository(tmp_path):
    py = _install(tmp_path)
    where = subprocess.run([str(py), "-c", "import vfiotest.fixtures, vfiotest; "
                                           "print(vfiotest.fixtures.__file__); print(vfiotest.__file__)"],
                           cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, check=True).stdout
    assert ROOT not in where and str(tmp_path / "venv") in where, where

    suite = tmp_path / "their-repo"
    suite.mkdir()
    (suite / "test_their_nic.py").write_text(textwrap.dedent(USER_SUITE))
    state = tmp_path / "state"
    p = subprocess.run([str(py), "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                        "--strict-markers", "test_their_nic.py"],
                       cwd=suite, env=dict(_clean_env(), VFIOTEST_STATE_DIR=str(state)),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "3 tests collected" in p.stdout, p.stdout
    # a test that reaches the emulated runner is a `vm` test, marked or not
    quick = subprocess.run([str(py), "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "not vm",
                            "test_their_nic.py"], cwd=suite, env=dict(_clean_env(), VFIOTEST_STATE_DIR=str(state)),
                           capture_output=True, text=True, timeout=120)
    assert "1/3 tests collected (2 deselected)" in quick.stdout, quick.stdout
    # the fixtures come from the plugin: asking for them is not "fixture 'vfio_group' not found"
    fx = subprocess.run([str(py), "-m", "pytest", "--fixtures", "-q", "-p", "no:cacheprovider", "test_their_nic.py"],
                        cwd=suite, env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert fx.returncode == 0, fx.stdout + fx.stderr
    for name in ("vfio_group", "container", "guest", "target_host", "kata_runtime"):
        assert f"\n{name} " in fx.stdout or f"\n{name}\n" in fx.stdout or f"{name} [" in fx.stdout, \
            f"{name} not offered by the plugin:\n{fx.stdout}"
    helptext = subprocess.run([str(py), "-m", "pytest", "--help"], cwd=suite, env=_clean_env(),
                              capture_output=True, text=True, timeout=120).stdout
    assert "--target=TARGET" in helptext and "--numvfs=N" in helptext
    # a collection does not reach, boot or touch any target, and leaves no session state behind
    assert "booting" not in p.stderr and "host state guard" not in p.stdout
    assert not state.exists() or not any(state.rglob("*")), sorted(map(str, state.rglob("*")))


def test_repository_conftest_only_loads_the_plugin():
    with open(os.path.join(ROOT, "conftest.py")) as f:
        code = "\n".join(line for line in f.read().split('"""')[-1].splitlines() if line.strip())
    assert code.strip() == 'pytest_plugins = ["vfiotest.fixtures"]'


#: pytest-profiling, a plugin many test trees carry, at a version this was tried with
PROFILING = ("pytest-profiling==1.8.1", "gprof2dot==2025.4.14", "six==1.17.0")


def test_the_plugin_lives_beside_pytest_profiling(tmp_path):
    """pytest-profiling owns --profile: the harness's device profile is --vfio-profile, its other
    options are under --vfio-* too, and pytest starts with both plugins installed."""
    py = _install(tmp_path)
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed",
                        "--disable-pip-version-check", "--no-warn-script-location", "--prefix", str(tmp_path / "venv"),
                        *PROFILING], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "test_x.py").write_text("def test_x():\n    pass\n")
    helptext = subprocess.run([str(py), "-m", "pytest", "--help"], cwd=tmp_path / "t", env=_clean_env(),
                              capture_output=True, text=True, timeout=120)
    assert helptext.returncode == 0, helptext.stderr[-2000:]
    out = helptext.stdout
    assert "--profile " in out and "--vfio-profile=VFIO_PROFILE" in out, out[-3000:]
    assert "--vfio-target=TARGET, --target=TARGET" in out and "--vfio-numvfs=N, --numvfs=N" in out
    run = subprocess.run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_x.py", "--profile"],
                         cwd=tmp_path / "t", env=dict(_clean_env(), VFIOTEST_STATE_DIR=str(tmp_path / "state")),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
