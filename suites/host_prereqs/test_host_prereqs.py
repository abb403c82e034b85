"""Is this host able to run the rest? Each test is one prerequisite, with the fix in its message."""

import re

import pytest

from vfiotest.fixtures.allure_report import attach_json

# the `vm` marker is given at run time, by the target (fixtures/__init__.py)


#: what each check read from the target (vfiotest.prereqs.gather), attached as its evidence
READ = {"kernel arguments": ("cmdline", "kernel"), "IOMMU enabled": ("cmdline", "iommu_groups", "iommu_units"),
        "interrupt remapping": ("irq_remapping", "unsafe_interrupts"), "cgroup mode": ("cgroup_mode",),
        "SELinux permissive or absent": ("selinux",), "VFIO modules available": ("modules",),
        "podman present": ("podman", "runc")}


@pytest.fixture
def prereq(request, prereq_checks, host_facts):
    """prereq(name): the check called `name`, its verdict and what it read attached to the result."""
    def get(name):
        c = next(c for c in prereq_checks if c.name == name)
        attach_json(f"{name}: what was read on the target", {
            "check": name, "status": c.status, "seen": c.seen, "fix": c.fix, "kernel_args": c.kernel_args,
            "read": {k: host_facts.get(k) for k in READ.get(name, ())}})
        return c
    return get


def test_kernel_arguments_configured(prereq, target_spec):
    """/proc/cmdline has what the profile and the Kata version need (intel_iommu=on; with Kata 1.x
    systemd.unified_cgroup_hierarchy=0): the missing ones named with the command that adds them."""
    from vfiotest.fixtures.prereqs import missing_text

    c = prereq("kernel arguments")
    assert c.ok, missing_text([c], target_spec)


def test_iommu_enabled(prereq, host_facts, target_spec):
    """The IOMMU translates (groups, units) because the command line asks for it, not by a kernel default."""
    from vfiotest.fixtures.prereqs import missing_text

    c = prereq("IOMMU enabled")
    assert c.ok, missing_text([c], target_spec)
    assert host_facts["iommu_groups"] > 0, "no IOMMU groups in /sys/kernel/iommu_groups"


def test_interrupt_remapping_or_unsafe_interrupts_stated(prereq):
    c = prereq("interrupt remapping")
    assert c.ok, c.line()


def test_cgroup_mode_matches_profile(prereq, target_spec):
    """The cgroup hierarchy mounted is the one the profile and the Kata version need (Kata 1.x: v1)."""
    from vfiotest.fixtures.prereqs import missing_text

    c = prereq("cgroup mode")
    assert c.ok, missing_text([c], target_spec)


def test_selinux_permissive_or_absent(prereq):
    c = prereq("SELinux permissive or absent")
    assert c.ok, c.line()


def test_vfio_modules_available(prereq, host_facts):
    c = prereq("VFIO modules available")
    assert c.ok, c.line()
    assert set(host_facts["modules"]) == {"vfio", "vfio_iommu_type1", "vfio_pci"}


def test_harness_has_cap_ipc_lock_on_target(target_host):
    """VFIO DMA mapping locks memory: the harness's own processes (root) must hold CAP_IPC_LOCK;
    containers get it with --cap-add CAP_IPC_LOCK (checked in podman_run)."""
    status = target_host.read_text("/proc/self/status")
    attach_json("the harness's capabilities on the target (/proc/self/status)",
                {line.split(":")[0]: line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith("Cap")})
    cap_eff = int(re.search(r"^CapEff:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    assert cap_eff & (1 << 14), f"CAP_IPC_LOCK (bit 14) missing from CapEff {cap_eff:x} on {target_host.name}"


def test_podman_present(prereq, testinfra_host):
    c = prereq("podman present")
    assert c.ok, c.line()
    assert testinfra_host.exists("podman"), "podman is not on the target's PATH (testinfra)"
    assert re.search(r"\d+\.\d+", c.seen), f"podman gave no version: {c.seen!r}"


def test_kata_check_passes(target_host, kata_runtime):
    """`kata-runtime kata-check` through the registered kata-vfio wrapper (our configuration.toml):
    KVM, vhost_vsock and the kernel modules Kata needs are there, and it can create containers."""
    res = target_host.run([kata_runtime.wrapper, "kata-check"], timeout=180)
    attach_json("kata-check's output", {"command": [kata_runtime.wrapper, "kata-check"], "exit": res.rc,
                                         "stdout": res.stdout, "stderr": res.stderr})
    assert res.ok, f"kata-check failed (exit {res.rc}):\n{res.stdout}{res.stderr}"
    said = res.stdout + res.stderr
    assert "System is capable of running Kata Containers" in said, said
    assert "System can currently create Kata Containers" in said, said
