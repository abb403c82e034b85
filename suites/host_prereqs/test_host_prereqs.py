"""Is this host able to run the rest? Each test is one prerequisite, with the fix in its message."""

import re

# the `vm` marker is given at run time, by the target (fixtures/__init__.py)


def _check(checks, name):
    return next(c for c in checks if c.name == name)


def test_kernel_arguments_configured(prereq_checks, target_spec):
    """/proc/cmdline has what the profile and the Kata version need (intel_iommu=on; with Kata 1.x
    systemd.unified_cgroup_hierarchy=0): the missing ones named with the command that adds them."""
    from vfiotest.fixtures.prereqs import missing_text

    c = _check(prereq_checks, "kernel arguments")
    assert c.ok, missing_text([c], target_spec)


def test_iommu_enabled(prereq_checks, host_facts, target_spec):
    """The IOMMU translates (groups, units) because the command line asks for it, not by a kernel default."""
    from vfiotest.fixtures.prereqs import missing_text

    c = _check(prereq_checks, "IOMMU enabled")
    assert c.ok, missing_text([c], target_spec)
    assert host_facts["iommu_groups"] > 0, "no IOMMU groups in /sys/kernel/iommu_groups"


def test_interrupt_remapping_or_unsafe_interrupts_stated(prereq_checks):
    c = _check(prereq_checks, "interrupt remapping")
    assert c.ok, c.line()


def test_cgroup_mode_matches_profile(prereq_checks, target_spec):
    """The cgroup hierarchy mounted is the one the profile and the Kata version need (Kata 1.x: v1)."""
    from vfiotest.fixtures.prereqs import missing_text

    c = _check(prereq_checks, "cgroup mode")
    assert c.ok, missing_text([c], target_spec)


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


def test_kata_check_passes(target_host, kata_runtime):
    """`kata-runtime kata-check` through the registered kata-vfio wrapper (our configuration.toml):
    KVM, vhost_vsock and the kernel modules Kata needs are there, and it can create containers."""
    res = target_host.run([kata_runtime.wrapper, "kata-check"], timeout=180)
    assert res.ok, f"kata-check failed (exit {res.rc}):\n{res.stdout}{res.stderr}"
    said = res.stdout + res.stderr
    assert "System is capable of running Kata Containers" in said, said
    assert "System can currently create Kata Containers" in said, said
