"""The ssh:// lane, set up as a user reaching a bare-metal runner sets it up: the emulated
runner's host key in ~/.ssh/known_hosts and a login key in ~/.ssh/ (a HOME of this test's own),
then `ci/main-job --target ssh://root@127.0.0.1:PORT --vfio-profile emulated`. What runs: the
host_prereqs and rebind suites whole (the PF-with-VFs refusal among them, which runs the CLI with
the session's --target and --profile) and a Kata container holding a VF on real Kata 1.12.1,
whose bundle, guest image and kernel the harness copies over SSH (an ssh:// target does not share
this machine's files). 0 failed, 0 skipped, and the host state guard says the runner was left as
found. The whole suites over ssh:// are a main job's length again; this is the part where the
lane differs (docs/fleet.md)."""

import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest
from _runner_env import runner_env

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800), pytest.mark.duration(240)]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KATA_TEST = "test_container_runs_on_the_kata_vfio_runtime"
SUBSET = f"host_prereqs or test_rebind or {KATA_TEST}"   # test_rebind: the module suites/rebind/test_rebind.py


def test_suites_over_ssh_with_the_users_known_hosts_and_key(tmp_path):
    state = tmp_path / "state"
    for env in runner_env(state):
        runner = state / "runner"
        port = json.loads((runner / "state.json").read_text())["port"]
        home = tmp_path / "home"
        (home / ".ssh").mkdir(parents=True, mode=0o700)
        # the host key as the runner pinned it: "[127.0.0.1]:PORT ssh-ed25519 ..."
        shutil.copy(runner / "known_hosts", home / ".ssh" / "known_hosts")
        shutil.copy(runner / "ssh" / "client_ed25519_key", home / ".ssh" / "id_ed25519")
        os.chmod(home / ".ssh" / "id_ed25519", 0o600)
        reports = tmp_path / "reports"
        user_env = {k: v for k, v in env.items() if not k.startswith("VFIOTEST_")}
        user_env.update(HOME=str(home), VFIOTEST_SKIP_SETUP="1", VFIOTEST_REPORTS=str(reports),
                        VFIOTEST_STATE_DIR=str(tmp_path / "controller"))   # another controller's records
        target = f"ssh://root@127.0.0.1:{port}"
        p = subprocess.run(["ci/main-job", "--target", target, "--vfio-profile", "emulated", "-p", "no:cacheprovider",
                            "-k", SUBSET], cwd=ROOT, env=user_env, capture_output=True, text=True, timeout=1700)
        out = p.stdout + p.stderr
        assert p.returncode == 0, out[-5000:]
        assert "host state guard: " in out and "left as found" in out, out[-3000:]
        cases = [c for c in ET.parse(reports / "junit.xml").getroot().iter("testcase")
                 if c.get("classname") != "vfiotest.session"]
        verdicts = {c.get("name"): ("skipped" if c.find("skipped") is not None else
                                    "failed" if c.find("failure") is not None or c.find("error") is not None
                                    else "passed") for c in cases}
        assert verdicts and set(verdicts.values()) == {"passed"}, verdicts
        suites = {c.get("classname").split(".")[1] for c in cases}
        assert suites == {"host_prereqs", "rebind", "podman_run"}, suites
        assert verdicts.get("test_pf_with_enabled_vfs_refused_and_keeps_them") == "passed", verdicts
        assert verdicts.get(KATA_TEST) == "passed", verdicts
        # the target the report names is the ssh:// one
        assert target in (reports / "summary.md").read_text(), (reports / "summary.md").read_text()[:2000]
