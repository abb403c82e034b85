"""The Kata guest image boots for real (QEMU under TCG here, no runner, no device, no Kata
runtime): the harness's init loads the modules and hands PID 1 to the bundle's kata-agent, whose
debug console (`agent.debug_console`) answers on the serial port, served as a unix socket the way
Kata 1.x serves console.sock. Over it (vfiotest.kata.console, the code the guest_hook suite uses)
the hook installed under <guest_hook_path>/prestart runs as the agent runs it. The VF cases are in
suites/guest_hook (a Kata VM in the runner)."""

import os
import re
import shlex
import signal
import subprocess

import pytest

from vfiotest.host import LocalHost
from vfiotest.kata import bundle, initrd
from vfiotest.kata.console import GuestReport, KataConsole

pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("kata-guest-image"), pytest.mark.duration(30)]

BOOT_TIMEOUT = 240.0     # TCG on 2 shared cores: the agent's console answers after about 30 s


@pytest.fixture(scope="module")
def built():
    found = bundle.find_bundle()
    if found is None:
        pytest.skip(f"no Kata 1.x bundle here ({bundle.BUNDLE_ENV} unset, {bundle.DEFAULT_BUNDLE} absent): "
                    f"the Kata guest image needs its kata-agent")
    return initrd.build_initrd(initrd.InitrdSpec(allowed_ids=("8086:10ca",), agent=found.agent))


@pytest.fixture(scope="module")
def console(built, tmp_path_factory):
    """The agent's debug console of the image booted in QEMU (TCG), as a KataConsole."""
    d = tmp_path_factory.mktemp("kata-guest")
    sock, channel, log = str(d / "console.sock"), str(d / "agent.sock"), str(d / "qemu.log")
    append = f"console=ttyS0 rdinit={built.init} agent.debug_console quiet panic=-1"
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "1", "-nodefaults",
           "-no-user-config", "-display", "none", "-no-reboot", "-net", "none", "-monitor", "none",
           "-serial", f"unix:{sock},server=on,wait=off",
           # the agent's channel (it exits when it finds neither a serial port nor vsock); nobody talks on it
           "-device", "virtio-serial-pci,id=ser0",
           "-chardev", f"socket,id=agent,path={channel},server=on,wait=off",
           "-device", "virtserialport,bus=ser0.0,chardev=agent,name=agent.channel.0",
           "-kernel", built.kernel, "-initrd", built.path, "-append", append]
    # `timeout` bounds QEMU even if this process dies; its own process group (timeout and QEMU)
    # is what the fixture kills
    with open(log, "w") as out:
        qemu = subprocess.Popen(["timeout", "-s", "KILL", str(int(BOOT_TIMEOUT + 600)), *cmd],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def stop():
        try:
            os.killpg(qemu.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        qemu.wait()

    try:
        con = KataConsole(LocalHost(), "tcg-guest", socket_path=sock)
        try:
            con.wait_ready(timeout=BOOT_TIMEOUT)
        except Exception:
            stop()
            with open(log) as f:
                print(f"QEMU ({shlex.join(cmd)}):\n{f.read()[-3000:]}")
            raise
        yield con
    finally:
        stop()
        for p in (sock, channel):
            if os.path.exists(p):
                os.remove(p)


def test_the_agent_is_pid_1_behind_the_harness_init(console):
    assert console.check("cat /proc/1/comm").strip() == "kata-agent"
    assert console.check("cat /proc/cmdline").split().count(f"rdinit={initrd.KATA_INIT_PATH}") == 1


def test_the_images_hook_runs_as_the_agent_runs_it(built, console):
    rep = GuestReport.read(console, container_id="tcg", annotation="8086:10ca", hook=built.hook_path)
    again, none, bad = (rep.run(k)["results"][0] for k in ("again", "none", "malformed"))
    # the container asked for 8086:10ca and this guest has none: the hook fails the start, saying so
    assert again["rc"] == 5, again
    assert "8086:10ca was asked for" in again["stderr"], again["stderr"]
    assert none["rc"] == 0, none                # an empty annotation asks for nothing
    assert bad["rc"] == 2, bad
    # what the hook's log in the guest recorded: the argv and stage it was given, the state's id
    starts = rep.log_for(action="start")
    assert [(e["argv"], e["stage"]) for e in starts] == [(["./vfio-hook", "prestart"], "prestart")] * 2, starts
    assert [e["state"]["id"] for e in starts] == ["vfiotest-again-1", "vfiotest-none-2"]
    assert [e["result"] for e in rep.log_for(container="vfiotest-none-2", action="select")] == ["no-devices"]
    assert rep.log_for(action="bind") == []
    errors = [e for e in rep.hook_log if e["action"] == "state" and e["result"] == "error"]
    assert len(errors) == 1 and "not JSON" in errors[0]["error"]
    assert set(rep.dev_vfio) <= {"vfio"}


def test_the_hook_compiles_nothing_in_the_guest(built, console):
    """The hook starts as the agent starts it (`python3 -IS`, its shebang) and every module it
    imports, its own library and the standard library's, loads from a .pyc in the image: Python's
    -v says `code object from '<...pyc>'` for each and never `code object from <...py>` (a
    compile, which costs seconds in a nested guest at every container start)."""
    lib = built.hook_path.rsplit("/prestart/", 1)[0] + "/lib"
    out = console.check(f"python3 -IS -v -c 'import sys; sys.path.insert(0, \"{lib}\"); import vfiotest.kata.hook' 2>&1")
    compiled = [line for line in out.splitlines() if re.match(r"^# code object from /", line)]
    loaded = [line for line in out.splitlines() if line.startswith("# code object from '")]
    assert not compiled, "compiled from source in the guest:\n" + "\n".join(compiled)
    assert any(f"'{lib}/vfiotest/kata/__pycache__/hook." in line for line in loaded), out[-2000:]
    assert any("'/usr/lib/python3" in line and "/json/__pycache__/" in line for line in loaded), out[-2000:]
