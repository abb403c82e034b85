"""A prepared runner's venv outside the checkout (VFIOTEST_VENV, ci/venv.sh): a fresh checkout
with VFIOTEST_SKIP_SETUP=1 uses it, its vfiotest pointed at that checkout without downloading
anything; with no venv the ci/ scripts stop with a clear word instead of falling back to the
system's python3.

The prepared venv here is made with `python -m venv` and sees this project's installed
dependencies through a .pth line (no network); the checkouts are copies of what an editable
install reads (pyproject.toml, README.md, lib/, fixtures/, ci/)."""

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARTS = ("pyproject.toml", "README.md", "constraints.txt", "lib", "fixtures", "ci")


def _checkout(dest):
    dest.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for part in PARTS:
        src = os.path.join(ROOT, part)
        if os.path.isdir(src):
            shutil.copytree(src, dest / part, ignore=ignore)
        else:
            shutil.copy(src, dest / part)
    return dest


def _where(venv):
    """The directory this venv's `vfiotest` package is imported from."""
    p = subprocess.run([str(venv / "bin" / "python"), "-c", "import os, vfiotest; print(os.path.dirname("
                        "os.path.realpath(vfiotest.__file__)))"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def _env(venv, **more):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VFIOTEST_", "PYTHON", "VIRTUAL_ENV"))}
    return dict(env, VFIOTEST_SKIP_SETUP="1", VFIOTEST_VENV=str(venv), PIP_NO_INDEX="1", **more)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A venv made for a first checkout that is gone since (as a CI workspace is cleaned)."""
    base = tmp_path_factory.mktemp("runner")
    first = _checkout(base / "first")
    venv = base / "venv"
    # no pip or setuptools of its own: those of this project's venv (setuptools >= 70.1, as ci/setup installs)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    # this project's dependencies (and setuptools, for the editable install) without the network
    with open(os.path.join(site, "vfiotest-test-deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "-e", str(first)], check=True, timeout=300)
    assert _where(venv) == str(first / "lib" / "vfiotest")
    shutil.rmtree(first)
    return venv


def test_a_fresh_checkout_uses_the_prepared_venv_pointed_at_itself(prepared, tmp_path):
    second = _checkout(tmp_path / "second")
    p = subprocess.run([str(second / "ci" / "campaign"), "--help"], cwd=second, env=_env(prepared),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "usage: ci/campaign" in p.stdout
    assert f"[venv] {prepared}: its vfiotest is" in p.stderr and f"pointing it at {second}" in p.stderr, p.stderr
    assert _where(prepared) == str(second / "lib" / "vfiotest")
    assert not (second / ".venv").exists()
    # the next job in the same checkout: nothing to do, nothing said
    p = subprocess.run([str(second / "ci" / "campaign"), "--help"], cwd=second, env=_env(prepared),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "[venv]" not in p.stderr, p.stderr


@pytest.mark.parametrize("script", ["main-job", "test", "campaign"])
def test_no_venv_stops_with_the_next_step_not_the_system_python(script, tmp_path):
    co = _checkout(tmp_path / "co")
    missing = tmp_path / "no-such-venv"
    p = subprocess.run([str(co / "ci" / script)], cwd=co, env=_env(missing), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert f"ci/{script}: no virtual environment at {missing}: run ci/setup" in p.stderr
    assert "VFIOTEST_VENV" in p.stderr
    assert not (co / "reports").exists()       # nothing ran, nothing written


def test_restore_without_a_venv_changes_nothing_and_says_so(tmp_path):
    co = _checkout(tmp_path / "co")
    missing = tmp_path / "no-such-venv"
    p = subprocess.run([str(co / "ci" / "fleet-job"), "restore"], cwd=co, env=_env(missing),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and f"no virtual environment at {missing}" in p.stderr and "nothing was changed" in p.stderr


def test_setup_has_a_bare_metal_runners_part_without_the_emulated_runner_or_the_report():
    """VFIOTEST_SETUP=runner: what a bare-metal runner needs, not QEMU, chromium, an sshd or Node.js;
    `--print` says it without changing anything (and without root); a bad part is refused."""
    def plan(**env):
        p = subprocess.run([os.path.join(ROOT, "ci", "setup"), "--print"], env=dict(_env("/v"), **env),
                           capture_output=True, text=True, timeout=60)
        return p.returncode, p.stdout, p.stderr

    rc, out, _ = plan(VFIOTEST_SETUP="runner")
    pkgs = next(line for line in out.splitlines() if line.startswith("packages: ")).split()[1:]
    assert rc == 0 and {"podman", "runc", "dracut-core", "python3-venv", "dpdk", "nvme-cli"} <= set(pkgs)
    assert not {"qemu-system-x86", "chromium", "openssh-server", "nodejs"} & set(pkgs)
    assert "backports" not in out and "venv: /v" in out
    rc, out, _ = plan()
    assert rc == 0 and {"qemu-system-x86", "chromium", "openssh-server"} <= set(out.split()) and "backports" in out
    rc, _, err = plan(VFIOTEST_SETUP="fleet")
    assert rc == 2 and "VFIOTEST_SETUP=fleet: use all (the default) or runner" in err
