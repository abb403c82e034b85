"""The harness's pytest options and their environment variables: bad values are refused at
start-up with the option named (not a traceback, not at fixture time), and an option given on
the command line replaces its environment variable. Runs pytest in a child process; no target
is reached."""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_child(tmp_path, *args, env=None):
    probe = tmp_path / "test_options_probe.py"
    probe.write_text(textwrap.dedent("""
        import json, os
        def test_show(request):
            print("OPTIONS " + json.dumps({"pf": request.config.getoption("--pf"),
                                           "numvfs": request.config.getoption("--numvfs"),
                                           "target": request.config.getoption("--target")}))
    """))
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("VFIOTEST_", "PYTEST_"))}
    full_env.update(env or {})
    # the repository's conftest as a plugin: the probe file lives outside the repository
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "conftest", "-s", "-q",
                           "--rootdir", ROOT, "-c", os.path.join(ROOT, "pytest.ini"), str(probe), *args],
                          cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120)


def shown(p):
    import json

    # with live logging (pytest.ini log_cli) the test's id comes first on its line
    line = next(out for out in p.stdout.splitlines() if "OPTIONS {" in out)
    return json.loads(line[line.index("OPTIONS {") + len("OPTIONS "):])


@pytest.mark.parametrize("value", ["abc", "-1", "2.5"])
def test_a_bad_numvfs_in_the_environment_is_a_usage_error_naming_it(tmp_path, value):
    p = pytest_child(tmp_path, env={"VFIOTEST_NUMVFS": value})
    assert p.returncode == 4, p.stdout + p.stderr          # pytest's usage error, not a crash
    said = p.stdout + p.stderr
    assert "--numvfs" in said and value in said and "Traceback" not in said, said


def test_help_works_whatever_the_environment_says(tmp_path):
    p = pytest_child(tmp_path, "--help", env={"VFIOTEST_NUMVFS": "abc"})
    assert p.returncode == 0 and "--numvfs" in p.stdout, p.stderr


def test_pf_on_the_command_line_replaces_the_environment(tmp_path):
    env = {"VFIOTEST_PF": "0000:01:00.0,0000:02:00.0", "VFIOTEST_TARGET": "sim:/nonexistent"}
    assert shown(pytest_child(tmp_path, env=env))["pf"] == ["0000:01:00.0", "0000:02:00.0"]
    got = shown(pytest_child(tmp_path, "--pf", "0000:03:00.0", env=env))
    assert got["pf"] == ["0000:03:00.0"]


def test_numvfs_from_the_environment_and_the_command_line(tmp_path):
    env = {"VFIOTEST_NUMVFS": "2", "VFIOTEST_TARGET": "sim:/nonexistent"}
    assert shown(pytest_child(tmp_path, env=env))["numvfs"] == 2
    assert shown(pytest_child(tmp_path, "--numvfs", "3", env=env))["numvfs"] == 3


@pytest.mark.parametrize("where", ["option", "env"])
def test_a_bogus_target_is_refused_at_start_up(tmp_path, where):
    args, env = (["--target", "bogus://x"], {}) if where == "option" else ([], {"VFIOTEST_TARGET": "bogus://x"})
    p = pytest_child(tmp_path, *args, env=env)
    said = p.stdout + p.stderr
    assert p.returncode == 4, said
    assert "unknown target 'bogus://x'" in said and "--target virtual" in said, said
    assert "OPTIONS" not in said                             # no test ran


@pytest.mark.parametrize("where", ["option", "env"])
def test_a_malformed_pf_is_refused_at_start_up(tmp_path, where):
    args, env = (["--pf", "zz:00"], {}) if where == "option" else ([], {"VFIOTEST_PF": "0000:01:00.0,zz:00"})
    p = pytest_child(tmp_path, *args, env={**env, "VFIOTEST_TARGET": "sim:/nonexistent"})
    said = p.stdout + p.stderr
    assert p.returncode == 4 and "zz:00" in said and "next step" in said and "Traceback" not in said, said
    assert "OPTIONS " not in p.stdout, "the session went on with a malformed PF"


def test_a_short_pf_is_given_its_domain(tmp_path):
    got = shown(pytest_child(tmp_path, "--pf", "01:00.0", env={"VFIOTEST_TARGET": "sim:/nonexistent"}))
    assert got["pf"] == ["0000:01:00.0"]


def test_the_plugin_works_without_pytests_logging_plugin(tmp_path):
    """`-p no:logging` (what the docs give to quiet the live progress) must not break start-up."""
    p = pytest_child(tmp_path, "-p", "no:logging", env={"VFIOTEST_TARGET": "sim:/nonexistent"})
    assert p.returncode == 0 and "INTERNALERROR" not in p.stdout + p.stderr, (p.stdout + p.stderr)[-2000:]


def test_an_unwritable_state_directory_fails_only_the_tests_that_need_a_session(tmp_path):
    """Installed, the plugin loads in every pytest run: a run whose tests use none of its fixtures
    passes where the state directory cannot be made; a test that needs the session errors with
    the directory, the cause and the next step (not an INTERNALERROR for the whole run)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    user = tmp_path / "test_user_suite.py"
    user.write_text("def test_plain():\n    assert True\n\n\ndef test_session(vfiotest_session):\n    pass\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VFIOTEST_", "PYTEST_"))}
    env["VFIOTEST_STATE_DIR"] = str(blocker / "state")
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path),
                        str(user)], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert "INTERNALERROR" not in out, out
    assert "1 passed, 1 error" in out, out
    assert f"cannot keep the session's state in {blocker / 'state'}" in out, out
    assert "VFIOTEST_STATE_DIR to a directory you can write" in out, out


@pytest.mark.parametrize(("args", "env"), [(["--kata-memory", "lots"], {}), ([], {"VFIOTEST_KATA_MEMORY": "64"})])
def test_a_bad_kata_memory_is_a_usage_error_naming_it(tmp_path, args, env):
    p = pytest_child(tmp_path, *args, env=env)
    said = p.stdout + p.stderr
    assert p.returncode == 4 and "--kata-memory" in said and "at least 128" in said and "Traceback" not in said, said


def test_lf_reruns_only_the_last_failures(tmp_path):
    """The cache provider is on (pytest.ini): a developer reruns `pytest -k rebind --lf` after a failure."""
    probe = tmp_path / "test_lf_probe.py"
    probe.write_text("def test_good():\n    pass\n\n\ndef test_bad():\n    assert False\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VFIOTEST_", "PYTEST_"))}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-q", "--rootdir", ROOT,
                               "-c", os.path.join(ROOT, "pytest.ini"), "-o", f"cache_dir={tmp_path / 'cache'}",
                               str(probe), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    first = run()
    assert first.returncode == 1 and "1 failed, 1 passed" in first.stdout, first.stdout[-2000:]
    again = run("--lf")
    assert again.returncode == 1 and "1 failed, 1 deselected" in again.stdout, again.stdout[-2000:]


def test_live_logging_only_in_this_projects_runs_or_when_asked(tmp_path):
    """Another project's tree keeps pytest's own output (no live logging turned on); this
    project's pytest.ini (vfio_live_log) or VFIOTEST_LIVE_LOG=1 turn it on for the progress lines."""
    tree = tmp_path / "theirs"
    tree.mkdir()
    (tree / "pytest.ini").write_text("[pytest]\n")
    (tree / "test_level.py").write_text(
        "def test_level(request):\n    print('LEVEL', request.config.getoption('log_cli_level'))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VFIOTEST_", "PYTEST_"))}

    def level(*args, extra=None):
        p = subprocess.run([sys.executable, "-m", "pytest", "-p", "vfiotest.fixtures", "-s", "-q", "-p",
                            "no:cacheprovider", *args], cwd=tree, env={**env, **(extra or {})},
                           capture_output=True, text=True, timeout=120)
        return next(line.split()[-1] for line in p.stdout.splitlines() if "LEVEL" in line)

    assert level("test_level.py") == "None"
    assert level("test_level.py", extra={"VFIOTEST_LIVE_LOG": "1"}) == "INFO"
    assert level("-c", os.path.join(ROOT, "pytest.ini"), "--rootdir", str(tree), str(tree / "test_level.py")) == "INFO"
