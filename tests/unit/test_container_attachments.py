"""The `container` fixture shows each run and start as a step and attaches `podman inspect` of every container a test made (and the JSON
a run printed, the probe's) to the test's Allure result before removing them. The podman client
and image are test doubles (fixtures of the demo suite's own conftest): no podman, no VM."""

import json
import os
import subprocess
import sys
import textwrap

CONFTEST = '''
import pytest

from vfiotest.podman.client import RunResult, StartRetry


class FakeContainer:
    def __init__(self, cid):
        self.attrs = {"Id": cid, "Name": "kept-" + cid, "State": {"Status": "running"}}


class FakeContainers:
    def get(self, cid):
        if cid == "gone":
            raise RuntimeError("no such container")
        return FakeContainer(cid)


class FakeClient:
    runtime, runtime_info = "runc", None

    def __init__(self):
        self.made, self.removed, self.client = [], [], type("Api", (), {"containers": FakeContainers()})()
        self.retried = [StartRetry("c99", "other-test", "not this test's")]

    def run(self, image, command, timeout=180.0, **kw):
        cid = "c%d" % len(self.made)
        self.made.append(cid)
        out = '{"ok": true, "group": "7"}\\n' if command[0] == "probe" else "hello\\n"
        return RunResult(cid, "run-" + cid, 0, out, "", "runc", {}, {"Id": cid, "Name": "run-" + cid,
                                                                   "HostConfig": {"Devices": ["/dev/vfio/7"]}})

    def start(self, image, command, **kw):
        # the first start was refused (the Kata agent did not answer) and tried again
        self.made += ["gone", "k1"]
        self.retried.append(StartRetry("gone", "refused-0", "Failed to check if grpc server is working"))

    def cleanup(self):
        self.removed = list(self.made)
        self.made.clear()


@pytest.fixture(scope="session")
def podman_client():
    return FakeClient()


@pytest.fixture(scope="session")
def podman_image():
    return type("Image", (), {"ref": "localhost/probe", "probe_command": ["probe"]})()
'''

SUITE = '''
def test_runs_and_starts(container, podman_client):
    container.probe(None)
    container.run(["echo", "hello"])
    container.start(["sleep", "60"])
'''


def test_inspect_and_probe_json_are_attached(tmp_path):
    d = tmp_path / "suites" / "demo_podman"
    d.mkdir(parents=True)
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (d / "test_demo_podman.py").write_text(textwrap.dedent(SUITE))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VFIOTEST_"))}
    env["VFIOTEST_STATE_DIR"] = str(tmp_path / "state")
    env["VFIOTEST_PODMAN_RUNTIME"] = "runc"      # the fake client's runtime: not a Kata lane
    alluredir = tmp_path / "allure"
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path),
                        f"--alluredir={alluredir}", "suites"], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    [result] = [json.loads(f.read_text()) for f in alluredir.glob("*-result.json")]
    attached = {a["name"]: (alluredir / a["source"]).read_text() for a in result["attachments"]}
    assert json.loads(attached["podman inspect run-c0"])["HostConfig"]["Devices"] == ["/dev/vfio/7"]
    assert json.loads(attached["output of run-c0 (JSON)"]) == {"group": "7", "ok": True}
    assert "podman inspect run-c1" in attached and "output of run-c1 (JSON)" not in attached   # printed no JSON
    assert json.loads(attached["podman inspect kept-k1"])["State"]["Status"] == "running"
    assert attached["podman inspect gone"].startswith("not available: no such container")
    # a start that was tried again is shown with the test that made it (and only there)
    assert "refused-0" in attached["start retried: refused-0"] and "grpc server" in attached["start retried: refused-0"]
    assert "start retried: other-test" not in attached
    assert [st["name"] for st in result["steps"]] == ["podman run probe", "podman run echo hello", "podman start sleep 60"]
