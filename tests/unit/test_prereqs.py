"""Prerequisite checks and kernel-argument editing, on facts and files a host could give."""

import pytest

from vfiotest import kernelargs, prereqs
from vfiotest.errors import ProvisionError
from vfiotest.pci import read_inventory
from vfiotest.profiles import get_profile
from vfiotest.testing.simsysfs import SimulatedHost

GOOD = {"cmdline": "BOOT_IMAGE=/vmlinuz intel_iommu=on systemd.unified_cgroup_hierarchy=0", "kernel": "6.1.0", "iommu_groups": 12,
        "iommu_units": ["dmar0"], "irq_remapping": True, "unsafe_interrupts": "N", "cgroup_mode": "hybrid",
        "selinux": None, "modules": {"vfio": "loaded", "vfio_iommu_type1": "loaded", "vfio_pci": "available"},
        "memlock": [65536, 65536], "uid": 0, "simulated": False, "podman": "podman version 4.3.1",
        "runc": "runc 1.1", "kata_runtime": None, "os_release": {}}


@pytest.fixture(scope="module")
def inventory(tmp_path_factory):
    return read_inventory(SimulatedHost.build(str(tmp_path_factory.mktemp("sim")), pfs=("i350",)))


def status(checks, name):
    return next(c for c in checks if c.name == name).status


def test_a_good_host_misses_nothing(inventory):
    checks = prereqs.check_all(dict(GOOD), inventory, get_profile("seed"))
    assert [c.line() for c in checks if c.status == prereqs.MISSING] == []
    assert prereqs.missing_kernel_args(checks) == []


def test_no_kata_installed_says_what_the_session_uses(inventory):
    """No kata-runtime on the target: with a Kata 1.x bundle (kata == 1) the bundle is used; without
    one the Kata layers are unavailable until VFIOTEST_KATA_BUNDLE names one. Either way the line
    points to `vfiotest kata detect`."""
    def seen(kata):
        c = next(c for c in prereqs.check_all(dict(GOOD), inventory, get_profile("seed"), kata)
                 if c.name == "Kata runtime present")
        assert c.status == prereqs.INFO
        return c.seen

    assert "bundle is used" in seen(1) and "unavailable" not in seen(1)
    assert "Kata layers are unavailable until VFIOTEST_KATA_BUNDLE names one" in seen(None)
    assert "build.sh" in seen(None)
    assert all("vfiotest kata detect" in seen(k) for k in (1, None))


def test_iommu_off_names_the_kernel_argument(inventory):
    facts = dict(GOOD, iommu_groups=0, iommu_units=[], cmdline="quiet")
    checks = prereqs.check_all(facts, inventory, get_profile("seed"))
    assert status(checks, "IOMMU enabled") == prereqs.MISSING
    assert status(checks, "kernel arguments") == prereqs.MISSING
    assert prereqs.missing_kernel_args(checks) == ["intel_iommu=on", "systemd.unified_cgroup_hierarchy=0"]


def test_amd_host_gets_amd_argument(inventory):
    facts = dict(GOOD, iommu_groups=0, iommu_units=["ivhd0"])
    assert prereqs.missing_kernel_args(prereqs.check_all(facts, inventory, get_profile("seed"))) == ["amd_iommu=on"]
    facts["cmdline"] += " amd_iommu=on"
    assert prereqs.missing_kernel_args(prereqs.check_all(facts, inventory, get_profile("seed"))) == []


def test_iommu_on_by_the_kernel_default_but_not_configured_is_missing(inventory):
    """Debian's 6.1 turns the Intel IOMMU on without intel_iommu=on (INTEL_IOMMU_DEFAULT_ON_INTGPU_OFF):
    the live effect alone does not meet a profile that asks for the argument."""
    facts = dict(GOOD, cmdline="systemd.unified_cgroup_hierarchy=0")
    checks = prereqs.check_all(facts, inventory, get_profile("emulated"))
    c = next(c for c in checks if c.name == "IOMMU enabled")
    assert c.status == prereqs.MISSING and "kernel's default only" in c.seen and c.kernel_args == ["intel_iommu=on"]
    assert prereqs.missing_kernel_args(checks) == ["intel_iommu=on"]


def test_iommu_argument_without_the_live_effect_is_missing(inventory):
    facts = dict(GOOD, iommu_groups=0, iommu_units=[])
    checks = prereqs.check_all(facts, inventory, get_profile("seed"))
    assert status(checks, "IOMMU enabled") == prereqs.MISSING and status(checks, "kernel arguments") == prereqs.OK
    assert prereqs.missing_kernel_args(checks) == []     # no argument fixes it: firmware


@pytest.mark.parametrize("kata,mode,ok", [(None, "unified", True), (None, "hybrid", True),
                                          (1, "unified", False), (1, "hybrid", True), (1, "legacy", True)])
def test_emulated_profile_cgroup_follows_the_kata_version(inventory, kata, mode, ok):
    facts = dict(GOOD, cgroup_mode=mode, cmdline="intel_iommu=on" + (" systemd.unified_cgroup_hierarchy=0" if ok and kata else ""))
    checks = prereqs.check_all(facts, inventory, get_profile("emulated"), kata=kata)
    assert (status(checks, "cgroup mode") == prereqs.OK) is ok
    assert ("systemd.unified_cgroup_hierarchy=0" in prereqs.missing_kernel_args(checks)) is (not ok)
    if kata == 1:
        assert "Kata 1.x needs cgroup v1" in next(c for c in checks if c.name == "cgroup mode").seen


@pytest.mark.parametrize("cmdline,arg,has", [
    ("intel_iommu=on", "intel_iommu=on", True),
    ("intel_iommu=on,sm_on", "intel_iommu=on", True),
    ("intel_iommu=on intel_iommu=off", "intel_iommu=on", False),     # the last one wins
    ("intel_iommu=off", "intel_iommu=on", False),
    ("", "intel_iommu=on", False),
    ("systemd.unified_cgroup_hierarchy=false", "systemd.unified_cgroup_hierarchy=0", True),
    ("systemd.unified_cgroup_hierarchy=1", "systemd.unified_cgroup_hierarchy=0", False),
    ("xintel_iommu=on", "intel_iommu=on", False),
])
def test_cmdline_has(cmdline, arg, has):
    assert prereqs.cmdline_has(cmdline, arg) is has


@pytest.mark.parametrize("version,bundle,major", [
    (None, None, None), (None, "/b/kata-1.12.1.tar.zst", 1), ("kata-runtime  : 1.12.1", None, 1),
    ("kata-runtime  : 3.2.0", None, None), ("kata-runtime  : 3.2.0", "/b.tar.zst", 1)])
def test_kata_major(version, bundle, major):
    assert prereqs.kata_major(version, bundle) == major


@pytest.mark.parametrize("mode,ok", [("hybrid", True), ("legacy", True), ("unified", False)])
def test_seed_profile_wants_cgroup_v1(inventory, mode, ok):
    checks = prereqs.check_all(dict(GOOD, cgroup_mode=mode), inventory, get_profile("seed"))
    assert (status(checks, "cgroup mode") == prereqs.OK) is ok
    assert ("systemd.unified_cgroup_hierarchy=0" in prereqs.missing_kernel_args(checks)) is not ok


def test_no_interrupt_remapping_is_missing_unless_unsafe_interrupts(inventory):
    facts = dict(GOOD, irq_remapping=False)
    assert status(prereqs.check_all(facts, inventory, get_profile("seed")), "interrupt remapping") == prereqs.MISSING
    facts["unsafe_interrupts"] = "Y"
    assert status(prereqs.check_all(facts, inventory, get_profile("seed")), "interrupt remapping") == prereqs.OK


def test_selinux_enforcing_and_absent_modules(inventory):
    facts = dict(GOOD, selinux="enforcing", modules={"vfio": "absent", "vfio_iommu_type1": "absent", "vfio_pci": "absent"})
    checks = prereqs.check_all(facts, inventory, get_profile("seed"))
    assert status(checks, "SELinux permissive or absent") == prereqs.MISSING
    assert status(checks, "VFIO modules available") == prereqs.MISSING


def test_no_pf_of_the_profile(inventory):
    checks = prereqs.check_all(dict(GOOD), inventory, get_profile("emulated").__class__(
        name="none", ids=frozenset({"dead:beef"}), vf_ids={"dead:beef": "dead:beef"}))
    assert status(checks, "supported SR-IOV PF found") == prereqs.MISSING


def test_grub_default_gets_arguments_and_keeps_the_rest():
    text = '# comment\nGRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX="quiet intel_iommu=off"\nGRUB_TIMEOUT=5\n'
    out = kernelargs.add_to_grub_default(text, ["intel_iommu=on", "systemd.unified_cgroup_hierarchy=0"])
    assert 'GRUB_CMDLINE_LINUX="quiet intel_iommu=on systemd.unified_cgroup_hierarchy=0"\n' in out
    assert out.startswith("# comment\nGRUB_DEFAULT=0\n") and out.endswith("GRUB_TIMEOUT=5\n")
    assert kernelargs.add_to_grub_default("GRUB_DEFAULT=0\n", ["intel_iommu=on"]).endswith('GRUB_CMDLINE_LINUX="intel_iommu=on"\n')


@pytest.mark.parametrize("bad", ["x; reboot", "a=$(id)", "", "intel_iommu=on quiet"])
def test_kernel_arguments_that_could_reach_a_shell_are_refused(bad):
    with pytest.raises(ProvisionError, match="refusing kernel argument"):
        kernelargs.validate_args([bad])


def test_reboot_of_the_local_machine_is_refused():
    from vfiotest.host import LocalHost

    with pytest.raises(ProvisionError, match="cannot reboot"):
        kernelargs.reboot_and_wait(LocalHost())


def test_podman_that_does_not_run_is_not_present(inventory):
    facts = dict(GOOD, podman="error: [Errno 13] Permission denied: 'podman'")
    c = next(c for c in prereqs.check_all(facts, inventory, get_profile("seed")) if c.name == "podman present")
    assert c.status == prereqs.MISSING and "Permission denied" in c.seen


def test_unsafe_interrupts_only_where_the_profile_allows_them(inventory):
    facts = dict(GOOD, irq_remapping=False, cmdline=GOOD["cmdline"])
    seed = prereqs.check_all(facts, inventory, get_profile("seed"))
    c = next(c for c in seed if c.name == "interrupt remapping")
    assert c.status == prereqs.MISSING and c.kernel_args == [] and "does not let the harness" in c.fix
    assert prereqs.missing_kernel_args(seed) == []
    emulated = prereqs.check_all(facts, inventory, get_profile("emulated"))
    assert prereqs.missing_kernel_args(emulated) == ["vfio_iommu_type1.allow_unsafe_interrupts=1"]
    facts["unsafe_interrupts"] = "Y"      # the effect after the reboot
    assert prereqs.missing_kernel_args(prereqs.check_all(facts, inventory, get_profile("emulated"))) == []
