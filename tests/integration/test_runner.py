"""The emulated SR-IOV runner, booted for real (QEMU under TCG).

Each runner here lives in its own temporary state directory, so a runner that
developers or other sessions keep up (`vfiotest runner up`) is never touched.
The asset cache is shared: the first run downloads the kernel (about 70 MB).
"""

import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap

import paramiko
import pytest
from _runner_env import exercise_podman, no_process_refers_to

from vfiotest.errors import ProvisionError, TargetError
from vfiotest.podman import PodmanBaseSettings
from vfiotest.runner import Runner, assets, bootcfg
from vfiotest.runner import runner as runner_mod
from vfiotest.sshhost import SshHost

pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("runner"), pytest.mark.duration(165)]


def _no_qemu_left(r):
    """Nothing of the runner runs: no QEMU of its state dir, no process holding its console log."""
    assert r.qemu_pids() == [], f"QEMU still running: {r.qemu_pids()}"
    no_process_refers_to(r.state_dir)


@pytest.fixture(scope="module")
def booted(tmp_path_factory):
    r = Runner(str(tmp_path_factory.mktemp("runner") / "runner"))
    lines = []
    r.up(progress=lines.append)
    r.boot_lines = lines
    yield r
    r.down()
    _no_qemu_left(r)


@pytest.fixture(scope="module")
def vm(booted):
    h = booted.host()
    yield h
    h.close()


def test_boots_with_both_pfs_and_ssh(booted, vm):
    st = booted.status()
    assert st["running"] and st["ssh_ready"], st
    pfs = booted.pfs()
    assert "nvme" in pfs
    if booted.qemu_has_igb:
        assert "igb" in pfs
    out = vm.run("for p in /sys/bus/pci/devices/*; do [ -e $p/sriov_totalvfs ] && echo ${p##*/} "
                 "$(cat $p/vendor $p/device $p/sriov_totalvfs) $(basename $(readlink $p/driver)); done",
                 timeout=60, check=True).stdout.split("\n")
    seen = {line.split()[0]: line.split()[1:] for line in out if line.strip()}
    assert seen[pfs["nvme"]] == ["0x1b36", "0x0010", "4", "nvme"]
    if "igb" in pfs:
        assert seen[pfs["igb"]] == ["0x8086", "0x10c9", "7", "igb"]


def test_the_test_image_is_in_podmans_storage_at_boot_from_the_read_only_store(booted, vm):
    """The runner boots with the test image in a read-only image store (a disk made on the
    controller): the sessions find it there and import nothing (about 90 s a boot under TCG); a
    container layer goes to the runner's own storage, the store stays as the controller made it."""
    from vfiotest.podman.image import default_recipe
    from vfiotest.runner import bootcfg

    recipe = default_recipe()
    assert booted.status()["image_store"] == str(recipe.store())
    assert any("in a read-only image store" in line for line in booted.boot_lines), booted.boot_lines
    out = vm.run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}} {{.ReadOnly}}"], timeout=120, check=True).stdout
    assert f"{recipe.ref} true" in out.split("\n"), out
    # a container of it writes to a layer of the runner's own storage
    cid = vm.run(["podman", "create", recipe.ref, "true"], timeout=120, check=True).stdout.strip()
    try:
        upper = vm.run(["podman", "inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", cid], timeout=60, check=True).stdout
        assert upper.startswith("/var/lib/containers/storage/"), upper
    finally:
        vm.run(["podman", "rm", "-f", cid], timeout=120)
    # and the store is read-only in the runner: nothing there changes it
    res = vm.run(["touch", f"{bootcfg.IMAGE_STORE_MOUNT}/overlay-images/x"], timeout=30)
    assert res.rc != 0, "the image store is writable in the runner"


def test_vm_environment(booted, vm):
    """What the other suites rely on inside the runner."""
    script = textwrap.dedent("""\
        set -e
        echo cmdline $(cat /proc/cmdline)
        echo dmar $(ls /sys/class/iommu)
        echo bashrc $(stat -c %s /root/.bashrc)
        echo cgroup_memory $(stat -f -c %T /sys/fs/cgroup/memory)
        echo cgroup_systemd $(stat -f -c %T /sys/fs/cgroup/systemd)
        echo root_ro $(touch /lower-probe 2>/dev/null && echo overlay-writable)
        for d in /var/lib/containers /run /tmp /var/lib/vfiotest; do touch $d/.probe && echo writable $d; done
        echo kvm $(test -c /dev/kvm && echo yes)
        echo modules $(lsmod | awk '{print $1}' | grep -E '^(vfio_pci|vfio_iommu_type1|igbvf|nvme|kvm_amd|kvm_intel|overlay)$' | sort | tr '\\n' ' ')
        echo modprobe $(modprobe -n -v vfio_pci >/dev/null && echo ok)
        echo python $(python3 -c 'import sys; print(sys.version_info[0])')
        echo godebug "${GODEBUG:-none}"
        """)
    out = vm.run(script, timeout=120, check=True).stdout
    facts = {}
    for line in out.splitlines():
        k, _, v = line.partition(" ")
        facts.setdefault(k, []).append(v)
    cmdline = facts["cmdline"][0].split()
    assert "intel_iommu=on" in cmdline and "systemd.unified_cgroup_hierarchy=0" in cmdline
    assert facts["dmar"][0].startswith("dmar")
    assert facts["bashrc"] == ["0"]
    assert facts["cgroup_memory"] == ["cgroupfs"] and facts["cgroup_systemd"] == ["cgroupfs"]
    assert set(facts["writable"]) == {"/var/lib/containers", "/run", "/tmp", "/var/lib/vfiotest"}
    assert facts["kvm"] == ["yes"]
    mods = facts["modules"][0].split()
    assert {"vfio_pci", "vfio_iommu_type1", "nvme", "overlay"} <= set(mods), mods
    assert "kvm_amd" in mods or "kvm_intel" in mods
    assert facts["python"] == ["3"]
    # under TCG the SSH sessions' Go programs (podman) run without the AVX and SHA code paths
    tcg = booted.status()["accel"] == "tcg"
    assert facts["godebug"] == ([bootcfg.TCG_GODEBUG] if tcg else ["none"])
    assert (f"vfiotest.godebug={bootcfg.TCG_GODEBUG}" in cmdline) == tcg


def test_controller_files_are_visible_read_only(booted, vm):
    path = os.path.join(assets.cache_root(), f"visible-{os.getpid()}")
    with open(path, "w") as f:
        f.write("from the controller\n")
    try:
        assert vm.run(["cat", path], timeout=30, check=True).stdout == "from the controller\n"
        # the 9p share is read-only; writes land in the tmpfs overlay, never on the controller
        vm.run(["sh", "-c", f"echo changed > {path}"], timeout=30, check=True)
        assert open(path).read() == "from the controller\n"
    finally:
        os.remove(path)


def test_host_key_is_pinned(booted, tmp_path):
    port = booted.port
    key = os.path.join(booted.ssh_dir, "client_ed25519_key")
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(TargetError, match="not pinned"):
        SshHost("127.0.0.1", port, key_filename=key, known_hosts=str(empty)).connect()
    wrong = tmp_path / "wrong_known_hosts"
    other = paramiko.Ed25519Key(filename=key)  # a valid ed25519 key, but not the VM's host key
    wrong.write_text(f"[127.0.0.1]:{port} ssh-ed25519 {other.get_base64()}\n")
    with pytest.raises(TargetError, match="differs"):
        SshHost("127.0.0.1", port, key_filename=key, known_hosts=str(wrong)).connect()


def test_podman_runc_runs_a_container(vm):
    """podman with runc runs a container in the runner (a busybox rootfs imported from stdin)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add("/bin/busybox", arcname="bin/busybox")
        for name in ("sh", "cat"):
            ti = tarfile.TarInfo(f"bin/{name}")
            ti.type, ti.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(ti)
    vm.run(["podman", "import", "-", "localhost/vfiotest-runner-probe:latest"], input=buf.getvalue(),
           timeout=180, check=True)
    res = vm.run(["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file",
                  "run", "--rm", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768",
                  "localhost/vfiotest-runner-probe:latest", "sh", "-c", "echo in-container; cat /proc/1/cgroup"],
                 timeout=300)
    assert res.rc == 0, res.stderr
    assert "in-container" in res.stdout


def test_podman_service_over_the_ssh_relay_and_its_dropin(vm):
    """The podman layer in the runner, reached through the SSH socket relay, with the settings
    drop-in written for the run and removed after."""
    with PodmanBaseSettings(vm) as s:
        assert vm.read_text(s.path).startswith("# written by vfiotest")
        exercise_podman(vm)
    assert not vm.exists(s.path)


@pytest.mark.mutating
def test_vfs_bind_and_restore_through_the_device_layer(booted, vm):
    """Done-when of issue 3: 2 VFs on each PF, one VF of each bound to vfio-pci, restored."""
    from vfiotest.bind import DeviceManager
    from vfiotest.journal import Journal
    from vfiotest.pci import read_inventory
    from vfiotest.sriov import set_numvfs

    first = read_inventory(vm)
    journal = Journal.open(vm)
    try:
        dm = DeviceManager(vm, "emulated", journal)
        bound = {}
        for kind, pf in booted.pfs().items():
            vfs = set_numvfs(vm, pf, 2, journal=journal, profile=dm.profile)
            assert len(vfs) == 2, (kind, vfs)
            bound[kind] = dm.bind_device(vfs[0])
        inv = read_inventory(vm)
        for kind, vf in bound.items():
            dev = inv.device(vf)
            assert dev.driver == "vfio-pci", (kind, vf, dev.driver)
            group = dev.iommu_group
            check = vm.run(f"test -c /dev/vfio/{group} && basename $(readlink /sys/bus/pci/devices/{vf}/driver)",
                           timeout=30)
            assert check.rc == 0 and check.stdout.strip() == "vfio-pci", (kind, vf, group, check.stdout, check.stderr)
        journal.restore_all()
    finally:
        try:
            journal.restore_all()
        finally:
            journal.close()
    assert first.diff(read_inventory(vm)) == []


def _occupied_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


def test_boot_timeout_reports_console_and_leaves_nothing(tmp_path, monkeypatch):
    # sshd "never answers" (the banner probe is made to fail), so the boot times out after
    # the VM has written to its console whatever the load on this machine
    monkeypatch.setattr(runner_mod, "wait_for_ssh_banner", lambda *a, **k: False)
    r = Runner(str(tmp_path / "runner"), boot_timeout=30)
    with pytest.raises(ProvisionError) as e:
        r.up()
    text = str(e.value)
    assert "did not answer on SSH within 30 s; last console lines:" in text
    tail = r.console_tail()
    assert tail and len(tail) <= 40
    assert "vfiotest-init" in "\n".join(tail)
    assert "\n  ".join(tail) in text
    _no_qemu_left(r)


def test_faults_orphan_port_in_use_and_old_qemu(tmp_path, monkeypatch):
    """A runner left by a killed session is stopped by the next up(); a taken port is skipped;
    a QEMU without igb boots with the NVMe PF only and says so; down() leaves nothing."""
    state = str(tmp_path / "runner")
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys,time; from vfiotest.runner import Runner; "
         f"Runner({state!r}).up(); print('UP', flush=True); time.sleep(3600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "UP"
    finally:
        child.send_signal(signal.SIGKILL)  # a session killed with its runner up
        child.wait()
    r = Runner(state)
    old = r.qemu_pids()
    assert len(old) == 1
    assert not r.is_up(), "a runner whose session died must not count as up"
    assert r.status()["orphaned"]

    # an "old" QEMU: reports 7.2 and no igb, otherwise the real one
    real = r.qemu
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        case "$*" in
          --version) echo "QEMU emulator version 7.2.0"; exit 0 ;;
          *"-device help"*) {real} "$@" | grep -v '^name "igb"'; exit 0 ;;
        esac
        exec {real} "$@"
        """))
    fake.chmod(0o755)
    busy = _occupied_port()
    ports = iter([busy.getsockname()[1]])
    real_free_port = runner_mod.free_port
    monkeypatch.setattr(runner_mod, "free_port", lambda: next(ports, None) or real_free_port())
    lines = []
    try:
        r2 = Runner(state, qemu_path=str(fake))
        assert not r2.qemu_has_igb
        r2.up(progress=lines.append)
        text = "\n".join(lines)
        assert "stopping a runner whose users are all gone" in text
        assert f"port {busy.getsockname()[1]} is taken" in text
        assert "NVMe SR-IOV PF only" in text
        assert all(p not in r2.qemu_pids() for p in old)
        assert r2.port != busy.getsockname()[1]
        assert set(r2.pfs()) == {"nvme"}
        assert r2.is_up()
    finally:
        busy.close()
        Runner(state).down()
    _no_qemu_left(r)
