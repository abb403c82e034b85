"""How the emulated runner's CPU is emulated: KVM when a trial guest runs under /dev/kvm, TCG
otherwise, VFIOTEST_RUNNER_ACCEL to force one (vfiotest.runner.qemu.choose_accel). The trial
runs a fake QEMU here: this machine's /dev/kvm cannot run a guest, so KVM is never measured."""

import stat

import pytest

from vfiotest.errors import ProvisionError
from vfiotest.runner import qemu


def fake_qemu(tmp_path, stdout: str, stderr: str = "", rc: int = 0) -> str:
    path = tmp_path / "qemu"
    path.write_text(f"#!/bin/sh\nprintf '%s' {stdout!r}\nprintf '%s' {stderr!r} >&2\nexit {rc}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def kvm_device(tmp_path):
    dev = tmp_path / "kvm"
    dev.write_text("")
    return str(dev)


def test_a_guest_that_prints_its_banner_means_kvm(tmp_path, kvm_device):
    q = fake_qemu(tmp_path, "[    0.000000] Linux version 6.1.0 ...\nKernel panic - not syncing: VFS\n")
    assert qemu.kvm_runs_a_guest(q, "/k", device=kvm_device) == (True, "")


def test_a_qemu_that_cannot_run_a_vcpu_means_tcg_with_its_words(tmp_path, kvm_device):
    q = fake_qemu(tmp_path, "", "qemu-system-x86_64: error: failed to set MSR 0x10a to 0xc000069\n", rc=134)
    ok, why = qemu.kvm_runs_a_guest(q, "/k", device=kvm_device)
    assert not ok and "failed to set MSR" in why


def test_no_kvm_device_means_tcg(tmp_path):
    ok, why = qemu.kvm_runs_a_guest("/nonexistent/qemu", "/k", device=str(tmp_path / "none"))
    assert not ok and "absent or not accessible" in why


def test_choose_accel(monkeypatch):
    monkeypatch.delenv(qemu.ACCEL_ENV, raising=False)
    works, broken = (lambda q, k: (True, "")), (lambda q, k: (False, "a KVM guest did not start: EPERM"))
    assert qemu.choose_accel("q", "k", trial=works)[0] == "kvm"
    accel, why = qemu.choose_accel("q", "k", trial=broken)
    assert accel == "tcg" and "EPERM" in why                       # said in the progress line
    assert qemu.choose_accel("q", "k", want="tcg", trial=works)[0] == "tcg"
    monkeypatch.setenv(qemu.ACCEL_ENV, "kvm")
    with pytest.raises(ProvisionError, match="EPERM") as e:
        qemu.choose_accel("q", "k", trial=broken)
    assert "tcg" in e.value.hint
    monkeypatch.setenv(qemu.ACCEL_ENV, "hvf")
    with pytest.raises(ProvisionError, match="not an accelerator"):
        qemu.choose_accel("q", "k", trial=works)


def test_the_command_line_follows_the_choice():
    kw = dict(kernel="/k", initrd="/i", append="", port=1, console_log="/c", pidfile="/p", nvme_image="/n")
    tcg, kvm = qemu.command("/q", **kw), qemu.command("/q", accel="kvm", **kw)
    assert tcg[tcg.index("-accel") + 1].startswith("tcg") and tcg[tcg.index("-cpu") + 1] == "max"
    assert kvm[kvm.index("-accel") + 1] == "kvm" and kvm[kvm.index("-cpu") + 1] == "host"


def test_more_than_one_vcpu_under_tcg_is_warned_about():
    assert qemu.cpus_warning("tcg", 1) is None
    assert qemu.cpus_warning("kvm", 4) is None        # not measured under KVM: nothing to warn of
    w = qemu.cpus_warning("tcg", 2)
    assert w and "2 vCPUs under TCG" in w and "VFIOTEST_RUNNER_CPUS" in w and "docs/runner.md" in w


def test_the_trial_runs_once_per_boot_of_the_machine_and_again_when_its_key_changes(monkeypatch, tmp_path):
    monkeypatch.delenv(qemu.ACCEL_ENV, raising=False)
    cache = str(tmp_path / "runner" / "kvm-trial.json")
    calls = []

    def broken(q, k):
        calls.append(q)
        return False, "a KVM guest did not start: no output"

    key = {"k": "boot-1|/usr/bin/qemu:1|/dev/kvm:2"}
    monkeypatch.setattr(qemu, "trial_key", lambda q, device=qemu.KVM_DEVICE: key["k"])
    accel, why = qemu.choose_accel("q", "k", trial=broken, cache=cache)
    assert (accel, len(calls)) == ("tcg", 1) and "earlier" not in why
    accel, why = qemu.choose_accel("q", "k", trial=broken, cache=cache)
    assert (accel, len(calls)) == ("tcg", 1)                          # kept: no second 30 s trial
    assert "no output" in why and "earlier in this boot" in why      # said as kept
    monkeypatch.setenv(qemu.ACCEL_ENV, "kvm")                          # kvm asked for: the kept failure refuses it
    with pytest.raises(ProvisionError, match="no output"):
        qemu.choose_accel("q", "k", trial=broken, cache=cache)
    assert len(calls) == 1
    monkeypatch.delenv(qemu.ACCEL_ENV)
    key["k"] = "boot-2|/usr/bin/qemu:1|/dev/kvm:2"                    # the machine rebooted (or kvm reloaded)
    assert qemu.choose_accel("q", "k", trial=lambda q, k: (calls.append(q) or True, ""), cache=cache)[0] == "kvm"
    assert len(calls) == 2
    (tmp_path / "runner" / "kvm-trial.json").write_text("{not json")  # a torn file: tried again, not trusted
    assert qemu.choose_accel("q", "k", trial=broken, cache=cache)[0] == "tcg" and len(calls) == 3
    assert qemu.choose_accel("q", "k", trial=broken)[0] == "tcg" and len(calls) == 4   # no cache: every time


def test_the_trial_key_names_this_boot_the_qemu_binary_and_the_kvm_node(tmp_path):
    fake = tmp_path / "qemu"
    fake.write_text("#!/bin/sh\n")
    dev = tmp_path / "kvm"
    dev.write_text("")
    k1 = qemu.trial_key(str(fake), device=str(dev))
    boot = open("/proc/sys/kernel/random/boot_id").read().strip()
    assert k1.startswith(boot) and str(fake) in k1 and str(dev) in k1
    assert qemu.trial_key(str(fake), device=str(dev)) == k1
    dev.chmod(0o600)                                                    # permissions changed: a new key
    assert qemu.trial_key(str(fake), device=str(dev)) != k1
    assert qemu.trial_key(str(fake), device=str(tmp_path / "none")).endswith(":absent")
