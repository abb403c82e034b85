"""Is this host able to run the rest? Each test is one prerequisite, with the fix in its message."""

import re

import pytest

from vfiotest import prereqs


def _check(checks, name):
    return next(c for c in checks if c.name == name)


def test_iommu_enabled(prereq_checks, host_facts):
    c = _check(prereq_checks, "IOMMU enabled")
    assert c.ok, c.line()
    assert host_facts["iommu_groups"] > 0, "no IOMMU groups in /sys/kernel/iommu_groups"


def test_interrupt_remapping_or_unsafe_interrupts_stated(prereq_checks):
    c = _check(prereq_checks, "interrupt remapping")
    assert c.ok, c.line()


def test_cgroup_mode_matches_profile(prereq_checks):
    c = _check(prereq_checks, "cgroup mode")
    assert c.ok, c.line()


def test_selinux_permissive_or_absent(prereq_checks):
    c = _check(prereq_checks, "SELinux permissive or absent")
    assert c.ok, c.line()


def test_vfio_modules_available(prereq_checks, host_facts):
    c = _check(prereq_checks, "VFIO modules available")
    assert c.ok, c.line()
    assert set(host_facts["modules"]) == {"vfio", "vfio_iommu_type1", "vfio_pci"}


def test_harness_has_cap_ipc_lock_on_target(target_host):
    """VFIO DMA mapping locks memory: the harness's own processes (root) must hold CAP_IPC_LOCK;
    containers get it with --cap-add CAP_IPC_LOCK (checked in podman_run)."""
    status = target_host.read_text("/proc/self/status")
    cap_eff = int(re.search(r"^CapEff:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    assert cap_eff & (1 << 14), f"CAP_IPC_LOCK (bit 14) missing from CapEff {cap_eff:x} on {target_host.name}"


def test_podman_present(prereq_checks, testinfra_host):
    c = _check(prereq_checks, "podman present")
    assert c.ok, c.line()
    assert testinfra_host.exists("podman"), "podman is not on the target's PATH (testinfra)"
    assert re.search(r"\d+\.\d+", c.seen), f"podman gave no version: {c.seen!r}"


def test_kata_runtime_present(prereq_checks, host_facts):
    if not host_facts["kata_runtime"]:
        pytest.skip("kata-runtime is not installed on the target; the guest is stood in by a nested QEMU VM "
                    "(see suites/guest_hook) and kata-vfio by runc (see suites/podman_run)")
    assert re.search(r"\d+\.\d+", host_facts["kata_runtime"]), host_facts["kata_runtime"]


def test_supported_pf_found(prereq_checks, profile):
    c = _check(prereq_checks, "supported SR-IOV PF found")
    assert c.ok, c.line()


def test_all_prerequisites_met(prereq_checks):
    missing = [c.line() for c in prereq_checks if c.status == prereqs.MISSING]
    assert not missing, "\n".join(missing)
