"""What the Allure results of a session hold (fixtures/allure_report.py): no phantom teardowns,
the labels of every test, the layers as steps, the VF group's inventories attached, the
categories and the executor. One small session in a child process on a simulated sysfs (no VM)."""

import json

import pytest
from allure_session import run_session

from vfiotest.fixtures.allure_report import executor_info
from vfiotest.report import category_of


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    p, alluredir, _ = run_session(tmp_path_factory.mktemp("allure"))
    assert "1 failed, 2 passed, 1 skipped" in p.stdout, p.stdout + p.stderr
    results = [json.loads(f.read_text()) for f in alluredir.glob("*-result.json")]
    containers = [json.loads(f.read_text()) for f in alluredir.glob("*-container.json")]
    return alluredir, {r["name"]: r for r in results}, containers


def labels(result, name):
    return [lab["value"] for lab in result["labels"] if lab["name"] == name]


def test_no_teardown_with_unknown_status_or_a_lambda_name(session):
    """allure-python#918: with pytest >= 9.1 every fixture got a `<fixture>::<lambda>` teardown
    with no status (pytest's own finalizer). The pinned pytest must not produce one."""
    _, _, containers = session
    afters = [a for c in containers for a in c.get("afters", [])]
    assert afters, "the demo's fixtures have teardowns: the check would see nothing"
    phantom = [(a["name"], a.get("status")) for a in afters
               if a.get("status") not in ("passed", "failed", "broken", "skipped") or "<lambda>" in a["name"]]
    assert phantom == [], phantom
    # the finalizer the demo added itself is there, with a status
    assert any(a["name"] == "with_finalizer::close_it" and a.get("status") == "passed" for a in afters), afters


def test_every_test_has_one_lane_and_the_suite_labels(session):
    _, results, _ = session
    assert set(results) == {"test_bound_group", "test_product_check_fails", "test_needs_a_layer", "host state guard"}
    for r in results.values():
        assert labels(r, "lane") == ["host"], (r["name"], r["labels"])
    bound = results["test_bound_group"]
    assert labels(bound, "suite") == ["demo_bind"]
    assert labels(bound, "story") == ["Demo: a VF bound to vfio-pci, and a check that fails."]
    assert labels(bound, "feature") == ["demo_bind"] and labels(bound, "severity") == ["normal"]
    assert labels(results["test_needs_a_layer"], "suite") == ["demo_env"]


def test_the_layers_are_steps_and_the_groups_inventories_are_attached(session):
    alluredir, results, containers = session
    steps = {s["name"]: s["status"] for c in containers for b in c.get("befores", []) for s in b.get("steps", [])}
    for name in ("sriov: VFs created on the profile's PFs", "vfio: the VF's IOMMU group bound to vfio-pci",
                 "target: reached; orphaned journals replayed; baseline inventory taken"):
        assert steps.get(name) == "passed", steps
    bound = results["test_bound_group"]
    assert [s["name"] for s in bound["steps"]] == ["read the group's device node"]
    attached = {a["name"]: (alluredir / a["source"]).read_text() for a in bound["attachments"]}
    before = [n for n in attached if n.endswith("inventory before")]
    after = [n for n in attached if n.endswith("inventory after")]
    changes = [n for n in attached if n.endswith(": changes")]
    assert len(before) == len(after) == len(changes) == 1, list(attached)
    assert "driver=igbvf" in attached[before[0]] or "driver=-" in attached[before[0]], attached[before[0]]
    assert attached[changes[0]].strip() == "none: left as found"


def test_environment_categories_and_executor_are_written(session):
    alluredir, _, _ = session
    env = dict(line.split("=", 1) for line in (alluredir / "environment.properties").read_text().splitlines())
    assert env["device.pf"] == "0000:10:00.0=8086:10c9" and env["device.vf_ids"] == "8086:10ca", env
    assert env["profile"] == "emulated" and env["run.command"].startswith("python -m pytest -p no:cacheprovider ") and "target.cmdline" in env
    cats = json.loads((alluredir / "categories.json").read_text())
    assert [c["name"].split(":")[0] for c in cats] == ["Product", "Environment", "Harness", "Environment",
                                                       "Environment", "Product", "Harness"]
    executor = json.loads((alluredir / "executor.json").read_text())
    assert executor["type"] == "local" and executor["buildName"].startswith("vfiotest ")


def test_categories_separate_environment_problems_from_product_failures():
    assert category_of("skipped", "kata layer unavailable: no bundle").startswith("Environment")
    assert category_of("failed", "the runner did not boot in 240 s").startswith("Environment")
    assert category_of("broken", "ssh: host unreachable\nmore").startswith("Environment")
    assert category_of("failed", "AssertionError: driver is igbvf, expected vfio-pci").startswith("Product")
    assert category_of("broken", "KeyError: 'x'").startswith("Harness")
    assert category_of("skipped", "not on this lane") is None


def test_a_failed_layer_is_classed_by_its_error_type_not_its_words():
    from vfiotest.errors import BindError, LeaseBusy, TargetError
    from vfiotest.fixtures.layers import failure_text
    from vfiotest.podman.client import ContainerError

    # a Kata start the guest hook refused: a product failure, although its words say "timed out"
    refused = ContainerError("container c1 did not start on runtime kata-vfio: vfio-hook timed out")
    assert category_of("error", failure_text("guest", refused)).startswith("Product"), failure_text("guest", refused)
    assert category_of("failed", failure_text("vfio", BindError("0000:01:10.0 not bound"))).startswith("Product")
    assert category_of("failed", failure_text("vfio", LeaseBusy("group 9 held"))).startswith("Environment")
    assert category_of("error", failure_text("host", TargetError("no answer"))).startswith("Environment")
    assert category_of("error", failure_text("podman", KeyError("x"))).startswith("Harness")
    assert category_of("error", failure_text("sriov", "busy for 300 s", "environment")).startswith("Environment")
    # a missing image is the environment's, whatever its class says
    assert category_of("error", failure_text("podman", ContainerError("image 'x' is not on r", category="environment"))
                       ).startswith("Environment")


def test_executor_from_github_and_gitlab_variables():
    gh = executor_info("abc123", {"GITHUB_ACTIONS": "true", "GITHUB_SERVER_URL": "https://github.example",
                                  "GITHUB_REPOSITORY": "o/r", "GITHUB_RUN_ID": "42", "GITHUB_RUN_NUMBER": "7",
                                  "GITHUB_WORKFLOW": "sriov-fleet", "GITHUB_JOB": "bare-metal",
                                  "RUNNER_NAME": "sriov-e810-1"})
    assert gh["name"] == "sriov-e810-1" and gh["type"] == "github" and gh["buildOrder"] == 7
    assert gh["buildUrl"] == "https://github.example/o/r/actions/runs/42" and "abc123" in gh["buildName"]
    gl = executor_info("abc123", {"GITLAB_CI": "true", "CI_JOB_NAME": "fleet", "CI_PIPELINE_IID": "3",
                                  "CI_JOB_URL": "https://gitlab.example/j/1", "CI_RUNNER_DESCRIPTION": "r1"})
    assert gl["type"] == "gitlab" and gl["name"] == "r1" and gl["buildUrl"].endswith("/j/1")


def test_a_layer_that_is_unavailable_is_a_skipped_step_with_its_reason(tmp_path):
    # the seed profile has no PF on the simulated host (an igb): the prereqs layer is unavailable
    p, alluredir, _ = run_session(tmp_path, args=("--vfio-profile", "seed"))
    assert "1 failed, 1 passed, 2 skipped" in p.stdout, p.stdout + p.stderr   # test_bound_group skipped
    containers = [json.loads(f.read_text()) for f in alluredir.glob("*-container.json")]
    steps = [s for c in containers for b in c.get("befores", []) for s in b.get("steps", [])
             if s["name"].startswith("prereqs: every prerequisite met")]
    assert steps and all(s["status"] == "skipped" for s in steps), steps
    assert "prereqs layer unavailable: supported SR-IOV PF found: none of" in steps[0]["statusDetails"]["message"]
