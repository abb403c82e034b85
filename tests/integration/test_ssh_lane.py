"""The ssh:// lane, set up as a user reaching a bare-metal runner sets it up: the emulated
runner's host key in ~/.ssh/known_hosts and a login key in ~/.ssh/ (a HOME of this test's own),
then `ci/main-job --target ssh://root@127.0.0.1:PORT --vfio-profile emulated`: every suite, on
real Kata 1.12.1, whose bundle, guest image and kernel the harness copies over SSH (an ssh://
target does not share this machine's files). The PF-with-VFs refusal among them runs the CLI
with the session's --target and --profile. 0 failed, 0 skipped, and the host state guard says the
runner was left as found (docs/fleet.md)."""

import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest
from _runner_env import IO_TESTS, ROOT, SUITES, booted_runner, junit_verdicts, keep_log, lane_failure, runner_dmesg

pytestmark = [pytest.mark.vm, pytest.mark.timeout(3000), pytest.mark.duration(920)]


def test_suites_over_ssh_with_the_users_known_hosts_and_key(tmp_path):
    state = tmp_path / "state"
    with booted_runner(state) as env:
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
        # the target is the emulated runner (a Kata VM nested in TCG), treated as bare metal: the
        # agent-check retry `virtual` gets by default is asked for by name (README, docs/podman.md)
        user_env.update(HOME=str(home), VFIOTEST_SKIP_SETUP="1", VFIOTEST_REPORTS=str(reports),
                        VFIOTEST_KATA_START_RETRIES="1",
                        VFIOTEST_STATE_DIR=str(tmp_path / "controller"))   # another controller's records
        target = f"ssh://root@127.0.0.1:{port}"
        p = subprocess.run(["ci/main-job", "--target", target, "--vfio-profile", "emulated", "-p", "no:cacheprovider"],
                           cwd=ROOT, env=user_env, capture_output=True, text=True, timeout=2900)
        out = p.stdout + p.stderr
        kern = runner_dmesg(env)
        kept = keep_log("ssh-lane", out, runner, kern)
        assert p.returncode == 0, lane_failure(out, kept, kern)
        assert "host state guard: " in out and "left as found" in out, out[-3000:]
        verdicts, suites = junit_verdicts(ET.parse(reports / "junit.xml").getroot())
        assert verdicts and set(verdicts.values()) == {"passed"}, verdicts
        assert suites == SUITES, suites
        assert verdicts.get("test_pf_with_enabled_vfs_refused_and_keeps_them") == "passed", verdicts
        assert IO_TESTS <= {n.split("[")[0] for n in verdicts}, sorted(verdicts)   # the VF's I/O
        # the target the report names is the ssh:// one
        assert target in (reports / "summary.md").read_text(), (reports / "summary.md").read_text()[:2000]
