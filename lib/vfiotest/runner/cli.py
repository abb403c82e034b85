"""`vfiotest runner up | down | status | ssh | console`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from . import Runner, bootcfg


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cmd_up(args: argparse.Namespace) -> int:
    r = Runner.default(**({"boot_timeout": args.timeout} if args.timeout else {}))
    with_ = list(args.with_ or [])
    if args.cgroup:
        with_.append(bootcfg.CGROUP_ARGS[args.cgroup])
    r.up(progress=_progress, persistent=True, without=args.without or [], with_=with_)
    st = r.status()
    print(f"runner up: pid {st['pid']}, ssh 127.0.0.1:{st['ssh_port']}, PFs {json.dumps(st['pfs'])}")
    print(f"kernel command line: {st['cmdline']}")
    print(f"  (GRUB_CMDLINE_LINUX from {st['boot_config']}: edit it, then `vfiotest runner reboot`)")
    if not st.get("igb"):
        print("note: this QEMU has no igb device (needs QEMU 8.0+): only the NVMe PF is present")
    print("it stays up until `vfiotest runner down`; test sessions with --target virtual use it")
    return 0


def cmd_reboot(args: argparse.Namespace) -> int:
    r = Runner.default(**({"boot_timeout": args.timeout} if args.timeout else {}))
    res = r.reboot(progress=_progress)
    print(f"runner rebooted in {res['seconds']:.0f} s; /proc/cmdline: {res['cmdline']}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    r = Runner.default()
    stopped = r.down(progress=_progress)
    print("runner stopped" if stopped else "no runner was running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    st = Runner.default().status()
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0 if st["running"] else 1
    if not st["running"]:
        print(f"runner: not running (state {st['state_dir']})")
        if st.get("boot_error"):
            print(f"  it rebooted and was not booted again: {st['boot_error']} (see "
                  f"{os.path.join(st['state_dir'], 'supervisor.log')}; fix {st['boot_config']}, then `vfiotest runner up`)")
        if st.get("qemu_said"):
            print(f"  QEMU's last words ({st['qemu_log']}):")
            for line in st["qemu_said"]:
                print(f"    {line}")
        return 1
    rss = st.get("rss_bytes")
    lines = [
        f"runner: running, QEMU pid {st['pid']}, up {st['uptime_s']:.0f} s",
        f"  ssh:      127.0.0.1:{st['ssh_port']} ({'ready' if st['ssh_ready'] else 'not answering'})",
        f"  PFs:      {json.dumps(st['pfs'])}" + ("" if st["igb"] else "  (no igb: QEMU older than 8.0)"),
        f"  kept by:  {_kept_by(st)}",
        f"  memory:   {rss / 2**20:.0f} MiB RSS" if rss else "  memory:   ?",
        f"  accel:    {st.get('accel') or '?'}" + (f" ({st['accel_why']})" if st.get("accel_why") else ""),
        "  images:   " + (f"the test image's read-only store {st['image_store']}, at {bootcfg.IMAGE_STORE_MOUNT}"
                           if st.get("image_store") else f"no read-only store: sessions import the test image "
                                                          f"({bootcfg.IMAGE_STORE_ENV})"),
        f"  kernel:   {st['kernel']}",
        f"  cmdline:  {st['cmdline']}",
        f"  boots:    {st['boots']}" + (" (rebooting)" if st["rebooting"] else ""),
        f"  grub:     {st['boot_config']}",
        f"  console:  {st['console_log']}",
        f"  QEMU log: {st['qemu_log']}",
    ]
    print("\n".join(lines))
    return 0


def _kept_by(st: dict[str, Any]) -> str:
    if st["persistent"]:
        return "runner up (until runner down)"
    if st["users"]:
        return "pids " + ", ".join(map(str, st["users"]))
    return "nobody (orphaned: the next up or down stops it)"


def cmd_ssh(args: argparse.Namespace) -> int:
    argv = Runner.default().ssh_argv(args.command)
    sys.stdout.flush()
    os.execvp(argv[0], argv)


def cmd_console(args: argparse.Namespace) -> int:
    r = Runner.default()
    for line in r.console_tail(args.lines):
        print(line)
    if not args.follow:
        return 0
    with open(r.console_log, "rb") as f:
        f.seek(0, 2)
        try:
            while True:
                data = f.read()
                if data:
                    sys.stdout.write(data.decode("utf-8", "replace"))
                    sys.stdout.flush()
                elif not r.qemu_pids():
                    return 0
                else:
                    time.sleep(0.3)
        except KeyboardInterrupt:
            return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("runner", help="the emulated SR-IOV runner VM (the `virtual` target)",
                              description="The emulated SR-IOV runner: a QEMU VM with a vIOMMU and igb/NVMe "
                                          "SR-IOV PFs, reached over SSH. See docs/runner.md.")
    sub = p.add_subparsers(dest="runner_command", metavar="ACTION")
    up = sub.add_parser("up", help="boot the runner and keep it up (sessions reuse it)")
    up.add_argument("--timeout", type=float, default=None, help="seconds to wait for SSH (default 240)")
    up.add_argument("--without", action="append", metavar="ARG",
                    help="remove ARG (name=value, or a bare name: every value) from GRUB_CMDLINE_LINUX in the "
                         "runner's GRUB defaults before it boots, e.g. --without intel_iommu=on (repeatable; kept "
                         "for later boots)")
    up.add_argument("--with", dest="with_", action="append", metavar="ARG",
                    help="add ARG to GRUB_CMDLINE_LINUX, replacing any of the same name (repeatable; kept)")
    up.add_argument("--cgroup", choices=sorted(bootcfg.CGROUP_ARGS),
                    help="boot with cgroup v1 (systemd.unified_cgroup_hierarchy=0, hybrid) or v2 (=1, unified); kept")
    up.set_defaults(func=cmd_up)
    rb = sub.add_parser("reboot", help="reboot the runner (its GRUB defaults read again) and wait for SSH",
                        description="Reboot the runner from inside (`reboot`); its supervisor boots it again with "
                                    "the kernel arguments of its GRUB defaults (<state>/runner/etc-default/grub, "
                                    "the runner's /etc/default/grub) and this waits until SSH answers.")
    rb.add_argument("--timeout", type=float, default=None, help="seconds to wait for SSH (default 240)")
    rb.set_defaults(func=cmd_reboot)
    sub.add_parser("down", help="stop the runner (also one left by a killed session)").set_defaults(func=cmd_down)
    st = sub.add_parser("status", help="is it up: pid, ssh port, uptime, PFs, memory, accelerator, image store")
    st.add_argument("--json", action="store_true", help="machine-readable")
    st.set_defaults(func=cmd_status)
    ssh = sub.add_parser("ssh", help="a shell (or a command) in the runner")
    ssh.add_argument("command", nargs="*", help="command to run instead of a shell")
    ssh.set_defaults(func=cmd_ssh)
    con = sub.add_parser("console", help="the runner's serial console log")
    con.add_argument("-n", "--lines", type=int, default=40, help="how many of the last lines (default 40)")
    con.add_argument("-f", "--follow", action="store_true", help="keep printing until the runner stops")
    con.set_defaults(func=cmd_console)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
