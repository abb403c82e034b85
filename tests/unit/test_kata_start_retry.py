"""A container start that Kata refused because its agent did not answer (the emulated runner's
nested Kata VM, on a loaded controller) is tried again with a new container, at most
`agent_check_retries` times, each retry kept in `client.retried`; any other start failure, and
the last one, is the result. podman's API and the target are test doubles here: the real
failure cannot be caused on demand."""

import pytest
from podman.errors import APIError

from vfiotest.errors import HarnessError
from vfiotest.podman.client import AGENT_CHECK_FAILED, ContainerError, RuntimeClient, agent_check_retries

AGENT = f"kata-vfio: {AGENT_CHECK_FAILED}: rpc error: code = Unavailable desc = transport is closing: OCI runtime error"


class Result:
    ok, stdout, stderr = True, "", ""


class Host:
    name = "runner"

    def run(self, cmd, timeout=None):
        return Result()


class Service:
    host, runtime = Host(), "kata-vfio"

    def log_tail(self, n):
        return ""


class Container:
    def __init__(self, api, n, error):
        self.api, self.id, self.name, self.error = api, f"{n:064x}", f"c{n}", error
        self.attrs = {"OCIRuntime": "kata-vfio", "State": {}}

    def start(self):
        if self.error:
            raise APIError("start failed", explanation=self.error)
        self.api.started.append(self.id)

    def reload(self):
        pass

    def wait(self, condition, timeout):
        return 0

    def logs(self, stdout, stderr):
        return b""

    def remove(self, **kw):
        self.api.removed.append(self.id)


class Containers:
    def __init__(self, errors):
        self.errors, self.made, self.started, self.removed = list(errors), {}, [], []

    def create(self, image, command, **kw):
        c = Container(self, len(self.made) + 1, self.errors.pop(0) if self.errors else None)
        self.made[c.id] = c
        return c

    def get(self, cid):
        return self.made[cid]


def client(errors, retries):
    api = type("Api", (), {})()
    api.containers = Containers(errors)
    rc = RuntimeClient(Service(), api, owner="t")
    rc.agent_check_retries = retries
    return rc, api.containers


def test_an_agent_that_did_not_answer_is_started_again_once():
    rc, api = client([AGENT], retries=1)
    c = rc.start("img", ["true"])
    assert api.started == [c.id] and c.name == "c2"
    assert [r.name for r in rc.retried] == ["c1"] and AGENT_CHECK_FAILED in rc.retried[0].error
    assert api.removed == [rc.retried[0].id]          # the refused container does not stay


def test_the_last_refusal_is_the_result():
    rc, api = client([AGENT, AGENT], retries=1)
    with pytest.raises(ContainerError, match="did not start on runtime kata-vfio.*transport is closing"):
        rc.start("img", ["true"])
    assert len(rc.retried) == 1 and api.started == []
    rc, api = client([AGENT, AGENT], retries=1)
    res = rc.run("img", ["true"])                      # run(): a start failure is a result
    assert res.exit_code is None and "transport is closing" in res.stderr and res.name == "c2"
    assert len(rc.retried) == 1 and api.started == []


def test_without_retries_the_first_refusal_is_the_result():
    rc, api = client([AGENT], retries=0)
    res = rc.run("img", ["true"])
    assert res.exit_code is None and AGENT_CHECK_FAILED in res.stderr
    assert rc.retried == [] and api.started == []


def test_a_start_the_api_client_gave_up_on_says_so_and_is_not_retried():
    import requests

    rc, api = client([], retries=1)
    c = api.create("img", ["true"])

    def slow():
        try:
            raise requests.exceptions.ReadTimeout("Read timed out. (read timeout=600)")
        except OSError as e:
            raise APIError("/containers/x/start", explanation="POST operation failed") from e
    c.start = slow
    api.create = lambda *a, **kw: c
    with pytest.raises(ContainerError, match=r"POST operation failed \(podman's API did not answer within 600 s"):
        rc.start("img", ["true"])
    assert rc.retried == []


def test_another_start_failure_is_never_retried():
    hook = "kata-vfio: rpc error: code = Internal desc = guest hook failed: exit status 5: OCI runtime error"
    rc, api = client([hook], retries=3)
    res = rc.run("img", ["true"])
    assert res.exit_code is None and "guest hook failed" in res.stderr
    assert rc.retried == [] and len(api.made) == 1


def test_the_retry_count_comes_from_the_target_and_the_environment(monkeypatch):
    monkeypatch.delenv("VFIOTEST_KATA_START_RETRIES", raising=False)
    assert (agent_check_retries(True), agent_check_retries(False)) == (1, 0)
    monkeypatch.setenv("VFIOTEST_KATA_START_RETRIES", "0")
    assert agent_check_retries(True) == 0
    monkeypatch.setenv("VFIOTEST_KATA_START_RETRIES", "2")
    assert agent_check_retries(False) == 2
    for bad in ("-1", "x", "4"):
        monkeypatch.setenv("VFIOTEST_KATA_START_RETRIES", bad)
        with pytest.raises(HarnessError, match="VFIOTEST_KATA_START_RETRIES") as e:
            agent_check_retries(True)
        assert e.value.exit_code == 2
