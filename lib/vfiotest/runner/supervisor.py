"""The runner's supervisor: boots the runner again after it rebooted itself.

QEMU runs with `-no-reboot`: a guest `reboot` makes it exit. This small detached process
(`python -m vfiotest.runner.supervisor STATE_DIR GENERATION`, started by `Runner._boot`)
watches the runner's QEMU; when it is gone and the console's last kernel line is
"reboot: Restarting system", it starts QEMU again with the same argv (same SSH port, disks,
state), the `-append` recomposed from the runner's GRUB defaults (bootcfg). Anything else
(power-off, a panic, QEMU killed: the campaign's SIGKILL, `runner down`) ends it, and the
runner stays down until `vfiotest runner up`.

It writes `supervisor.pid` ("pid start") and logs to `supervisor.log` in the state directory;
it stops when the state's generation is no longer its own (the runner was stopped or booted
anew). It takes the runner lock only for the relaunch itself.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import filelock

from ..sshhost import wait_for_ssh_banner
from . import bootcfg, qemu
from .runner import Runner, _is_running, _proc_start

POLL = 0.5


def log(r: Runner, text: str) -> None:
    with open(r.supervisor_log, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")


def mine(r: Runner, generation: str) -> bool:
    return r._read_state().get("generation") == generation


def relaunch(r: Runner, generation: str) -> bool:
    """Start QEMU again after a guest reboot; False when it must not or could not."""
    try:
        with open(r.boot_file) as f:
            boot = json.load(f)
        with open(r.grub_path) as f:
            grub = f.read()
        append = bootcfg.append(boot["base_args"], grub, path=r.grub_path)
    except (OSError, ValueError, KeyError) as e:
        log(r, f"cannot compose the command line again: {e}; the runner stays down")
        r._set_state(boot_error=str(e), rebooting=False)
        return False
    except Exception as e:   # ProvisionError from a bad GRUB_CMDLINE_LINUX
        log(r, f"{e}; the runner stays down")
        r._set_state(boot_error=str(e), rebooting=False)
        return False
    argv = list(boot["argv"])
    argv[argv.index("-append") + 1] = append
    if os.path.exists(r.console_log):
        shutil.copyfile(r.console_log, r.console_log + ".prev")
    rc, said = qemu.launch(argv, r.qemu_stderr, r.qemu_log)
    if rc != 0:
        log(r, f"QEMU refused to start again (exit {rc}): {said.strip()[-600:]}")
        r._set_state(boot_error=f"QEMU exit {rc}: {said.strip()[-300:]}", rebooting=False)
        return False
    pids = r.qemu_pids()
    st = r._read_state()
    r._set_state(pid=pids[0] if pids else None, started=time.time(), rebooting=True, cmdline=append,
                 boots=int(st.get("boots") or 1) + 1, boot_error=None)
    log(r, f"guest rebooted: QEMU started again (pid {pids[0] if pids else '?'}), -append {append}")
    return True


def supervise(state_dir: str, generation: str) -> int:
    r = Runner(state_dir)
    ident = f"{os.getpid()} {_proc_start(os.getpid())}"
    with open(r.supervisor_pidfile + ".tmp", "w") as f:
        f.write(ident + "\n")
    os.replace(r.supervisor_pidfile + ".tmp", r.supervisor_pidfile)
    log(r, f"supervising generation {generation}")
    booting = False     # QEMU started again by us: the reboot is over when SSH answers
    try:
        while True:
            pids = r.qemu_pids()
            while pids and all(_is_running(p) for p in pids):
                st = r._read_state()
                if st.get("generation") != generation:
                    return 0
                if booting and st.get("port") and wait_for_ssh_banner("127.0.0.1", st["port"], timeout=1):
                    r._set_state(rebooting=False)
                    booting = False
                time.sleep(POLL)
                pids = r.qemu_pids()
            if not mine(r, generation):
                return 0
            try:
                with open(r.console_log, errors="replace") as f:
                    how = bootcfg.last_reboot(f.read())
            except OSError:
                how = None
            if how != "restart":
                log(r, f"QEMU exited ({how or 'killed, crashed or panicked'}): not starting it again")
                r._set_state(rebooting=False)
                return 0
            try:
                with filelock.FileLock(os.path.join(state_dir, "runner.lock"), timeout=120):
                    if not mine(r, generation) or r.qemu_pids():
                        return 0
                    ok = relaunch(r, generation)
            except filelock.Timeout:
                if not mine(r, generation) or r.qemu_pids():
                    return 0
                ok = relaunch(r, generation)
            if not ok:
                return 1
            booting = True
    finally:
        try:
            with open(r.supervisor_pidfile) as f:
                if f.read().strip() == ident:
                    os.remove(r.supervisor_pidfile)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m vfiotest.runner.supervisor STATE_DIR GENERATION", file=sys.stderr)
        return 2
    return supervise(args[0], args[1])


if __name__ == "__main__":
    sys.exit(main())
