"""What a container that did not exit in time reports of its Kata guest: the debug console's
answer to GUEST_VIEW_CMD made short (memory, each process's state, the kernel's last lines);
nothing when the container has no Kata console (runc); the console's words when it is there and
does not answer. The console itself is tested against a real shell in test_kata_console.py."""

import pytest

from vfiotest.host import LocalHost
from vfiotest.podman import diagnose

# the shape of the guest's answer, from a Kata 1.12.1 guest of the emulated runner (trimmed)
ANSWER = """=meminfo\r
MemTotal:         626680 kB\r
MemFree:           40212 kB\r
MemAvailable:      30100 kB\r
Buffers:               0 kB\r
=stat\r
10 (mm_percpu_wq) I 2 0 0 0 -1 69238880 0 0 0 0 0 0 0 0 0 -20 1 0 2 ...\r
1 (init) S 0 1 1 0 -1 4194560 1093 0 0 0 3 10 0 0 20 0 1 0 4 5566464 258 ...\r
84 (kata-agent) S 1 84 84 34816 84 4194560 2187 0 0 0 48 43 0 0 20 0 9 0 71 ...\r
121 (python3) D 84 121 121 0 -1 4194560 66000 0 0 0 900 4100 0 0 20 0 1 0 900 ...\r
2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 2 ...\r
130 (sh (x)) R 84 130 130 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 950 ...\r
=dmesg\r
""" + "".join(f"[ {i}.000000] line {i}\r\n" for i in range(30))


def test_the_answer_is_made_short():
    text = diagnose.summarize_guest_view(ANSWER)
    lines = text.splitlines()
    assert lines[0] == "memory: MemTotal 626680 kB, MemFree 40212 kB, MemAvailable 30100 kB"
    assert lines[1] == "processes (pid comm state): 1 init S; 84 kata-agent S; 121 python3 D; 130 sh (x) R"
    assert lines[2] == "kernel (last lines):"
    assert lines[3:] == [f"[ {i}.000000] line {i}" for i in range(10, 30)]


def test_an_answer_without_sections_says_so():
    assert diagnose.summarize_guest_view("sh: cat: not found").splitlines()[:2] == [
        "memory: ?", "processes (pid comm state): ?"]


def test_no_console_no_view_and_a_bad_id_is_refused():
    cid = "ab" * 32
    assert diagnose.guest_view(LocalHost(), cid) == ""      # /run/vc/vm/<id>/console.sock absent here
    with pytest.raises(ValueError):
        diagnose.guest_view(LocalHost(), "abc; reboot")


DMESG = """\
[    1.723490] DMAR: No RMRR found
[    5.870943] kvm: Nested Virtualization enabled
[   12.000000] igb 0000:01:00.0: 4 VFs allocated
[  404.374200] ------------[ cut here ]------------
[  404.374210] WARNING: CPU: 0 PID: 889 at arch/x86/kvm/svm/nested.c:1234 nested_svm_vmexit+0x5/0x10 [kvm_amd]
[  404.374266] Modules linked in: nfnetlink vhost_net kvm_amd kvm vfio_pci
[  404.374300] CPU: 0 PID: 889 Comm: qemu-system-x86 Not tainted 6.1.0-57-amd64 #1
[  404.374310] RIP: 0010:nested_svm_vmexit+0x5/0x10 [kvm_amd]
[  404.374320] Call Trace:
[  404.374330]  <TASK>
[  500.000000] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [qemu-system-x86:901]
[  501.000000] Out of memory: Killed process 901 (qemu-system-x86)
"""


def test_kernel_lines_keep_what_a_warning_says_and_where():
    got = diagnose.kernel_lines(DMESG).splitlines()
    assert [ln.split("] ", 1)[1].split(":")[0] for ln in got] == [
        "DMAR", "kvm", "WARNING", "Modules linked in", "RIP", "watchdog", "Out of memory"], got
    assert "nested_svm_vmexit" in got[2] and "stuck for 22s" in got[5]
    assert diagnose.kernel_lines(DMESG, 2).splitlines() == got[-2:]
    assert diagnose.kernel_lines("") == ""
