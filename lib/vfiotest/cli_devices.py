"""`vfiotest devices | bind | unbind | restore | doctor`: the device layer from the command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

from . import constants, nvme_virt, prereqs
from .bind import VFIO_DRIVER, DeviceManager, restore_driver
from .cli import PROFILE_UNUSED, add_target_argument, cli_journal
from .errors import HarnessError, TargetError
from .host import Host
from .journal import orphaned_journals, restore_orphans, undo_entries
from .lease import LeasePool, still_on
from .pci import Inventory, PciAddress, PciDevice, read_inventory
from .prereqs import Check
from .profiles import Profile, get_profile
from .sriov import pf_lease_name
from .targets import Close, default_profile, open_host, target_spec


def _opened(args: argparse.Namespace, lasting: bool = False) -> tuple[Host, Close, Profile]:
    """(host, close, profile) for --target/--profile; the profile is checked before connecting.
    lasting: the command makes a change meant to outlive it (bind); on the emulated runner that
    needs a runner already up (one booted for the command would be stopped at its end)."""
    spec = target_spec(args.target)
    profile = get_profile(default_profile(spec, args.profile))
    if lasting and spec == "virtual":
        from .runner import Runner

        if not Runner.default().is_up():
            raise TargetError(
                "the emulated runner is not up: a device bound on a runner booted for this one command "
                "would be back on its driver when the command stops the runner",
                hint="start it first with `vfiotest runner up` (and `vfiotest runner down` when done)")
    host, close = open_host(spec, progress=lambda m: print(m, file=sys.stderr))
    return host, close, profile


# -- devices ---------------------------------------------------------------------------------
def cmd_devices(args: argparse.Namespace) -> int:
    host, close, profile = _opened(args)
    try:
        inv = read_inventory(host)
        leases = LeasePool(host).held()
        # NVMe VFs: their secondary controller's state (online, resources), one nvme-cli call per PF
        nvme_vfs: dict[str, dict] = {}
        for a, d in sorted(inv.devices.items()):
            if d.sriov is not None and d.sriov.numvfs and nvme_virt.primary_device(host, a):
                nvme_vfs.update(nvme_virt.vf_states(host, a, [v.address for v in inv.vfs_of(a)]))
    finally:
        close()
    rows: list[dict[str, Any]] = []
    for a, d in sorted(inv.devices.items()):
        notes = []
        if a in inv.protected:
            notes.append("protected: " + inv.protected[a])
        elif profile.allows(d.vendor_device):
            notes.append("allowed")
        lease = leases.get(d.iommu_group or "")
        if lease is not None and still_on(lease, inv.groups.get(d.iommu_group or "", [])):
            notes.append(f"leased by pid {lease.get('pid', '?')}")
        count = leases.get(pf_lease_name(a))
        if count is not None:
            notes.append(f"VF count held by pid {count.get('pid', '?')}")
        if d.physfn:
            notes.append(f"VF of {d.physfn}")
        if a in nvme_vfs:
            notes.append(nvme_virt.describe(nvme_vfs[a]))
        rows.append({"address": a, "id": d.vendor_device, "class": d.pci_class, "driver": d.driver,
                     "driver_override": d.driver_override, "iommu_group": d.iommu_group,
                     "group_size": len(inv.groups.get(d.iommu_group or "", [])) or None,
                     "vfio_node": inv.vfio.get(d.iommu_group or ""),
                     "sriov": {"numvfs": d.sriov.numvfs, "totalvfs": d.sriov.totalvfs,
                               "drivers_autoprobe": d.sriov.drivers_autoprobe} if d.sriov else None,
                     "physfn": d.physfn, "net": d.net, "protected": inv.protected.get(a),
                     "allowed": profile.allows(d.vendor_device), "nvme_secondary": nvme_vfs.get(a), "notes": notes})
    if args.json:
        print(json.dumps({"profile": profile.name, "identity": inv.identity, "devices": rows}, indent=1))
        return 0
    head = ("ADDRESS", "ID", "CLASS", "DRIVER", "OVERRIDE", "GROUP", "/DEV/VFIO", "SR-IOV", "NET", "NOTES")
    table: list[tuple[Any, ...]] = [head]
    for r in rows:
        table.append((r["address"], r["id"], r["class"], r["driver"] or "-", r["driver_override"] or "-",
                      f"{r['iommu_group']}" + (f" ({r['group_size']})" if (r["group_size"] or 0) > 1 else "")
                      if r["iommu_group"] is not None else "-",
                      r["vfio_node"] or "-",
                      f"{r['sriov']['numvfs']}/{r['sriov']['totalvfs']}" if r["sriov"] else "-",
                      ",".join(r["net"]) or "-", "; ".join(r["notes"])))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head) - 1)]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
    print(f"\nprofile {profile.name}; host {inv.identity.get('hostname')}; "
          f"{len(inv.devices)} devices, {len(inv.groups)} IOMMU groups")
    return 0


# -- bind / unbind / restore ---------------------------------------------------------------------
@contextlib.contextmanager
def _leased(host: Host, dev: PciDevice) -> Iterator[None]:
    """For the command's length, the lease of `dev`'s IOMMU group and, for a PF or a VF, the
    PF's (the one its VF count is changed under): a device that a test or session holds is
    refused (LeaseBusy, exit 7, naming the holder), and none can lease it half-way through."""
    pool = LeasePool(host)
    names: list[tuple[str, list[str] | None]] = [(dev.iommu_group, [dev.address])] if dev.iommu_group else []
    pf = dev.physfn if dev.is_vf else (dev.address if dev.is_pf else None)
    if pf:
        names.append((pf_lease_name(pf), None))
    with contextlib.ExitStack() as stack:
        for name, devices in names:
            stack.enter_context(pool.acquire(name, test_id=f"vfiotest (CLI) on {dev.address}", devices=devices))
        yield


def cmd_bind(args: argparse.Namespace) -> int:
    address = PciAddress(args.address)  # a malformed address fails before anything is opened
    host, close, profile = _opened(args, lasting=True)
    try:
        # what is refused (exit 3) is refused whoever holds the device; then its leases (exit 7)
        dev = DeviceManager(host, profile).check_bind(read_inventory(host), address, whole_group=args.group)
        with _leased(host, dev), cli_journal(host) as journal:
            dm = DeviceManager(host, profile, journal)
            bound = dm.bind_group(address) if args.group else [dm.bind_device(address)]
            inv = dm.inventory()
    finally:
        close()
    group = inv.device(address).iommu_group
    for a in bound:
        print(f"{a} is on {VFIO_DRIVER}")
    print(f"IOMMU group {group}: /dev/vfio/{group} ({inv.vfio.get(group or '', 'missing')})")
    print("undo with: vfiotest unbind " + address + (" (each device of the group)" if len(bound) > 1 else ""))
    return 0


def _restore_address(host: Host, address: str) -> list[str]:
    """Undo what journals (the CLI's and orphans) recorded for `address`; returns what was done."""
    done: list[str] = []
    journals = [j for j in orphaned_journals(host, include_kept=True)]
    try:
        for j in journals:
            entries = [e for e in j.entries() if e.get("address") == address]
            if entries:
                undo_entries(host, j, entries)
                done.append(f"restored {address} from journal {j.owner}")
    finally:
        for j in journals:
            j.close()
    return done


def cmd_unbind(args: argparse.Namespace) -> int:
    address = PciAddress(args.address)
    host, close, profile = _opened(args)
    try:
        inv = read_inventory(host)                 # no such device: exit 4 first
        with _leased(host, inv.device(address)):
            done, after = _unbind(host, profile, inv, address)
    finally:
        close()
    print("\n".join(done))
    print(f"{address} is now on {after.driver or 'no driver'}")
    return 0


def _unbind(host: Host, profile: Profile, inv: Inventory, address: str) -> tuple[list[str], PciDevice]:
    dev = inv.device(address)
    done = _restore_address(host, address)
    if not done:
        if dev.driver != VFIO_DRIVER and not dev.driver_override:
            done.append(f"{address} is on {dev.driver or 'no driver'} and no journal records a change: nothing to do")
            return done, dev
        # bound by hand, outside vfiotest: give it to its native driver, with the same safety checks
        dm = DeviceManager(host, profile)
        dm.check_device(inv, address)
        restore_driver(host, address, None, None)
        host.write_text("/sys/bus/pci/drivers_probe", address)
        done.append(f"{address} released from {VFIO_DRIVER} (no journal entry: probed for its native driver)")
    return done, read_inventory(host).device(address)


def cmd_restore(args: argparse.Namespace) -> int:
    address = PciAddress(args.address) if args.address else None
    host, close, profile = _opened(args)
    try:
        if address:
            undone = _restore_address(host, address)
            print("\n".join(undone) or f"no journal records a change to {address}: nothing to do")
        else:
            from .session import restore_orphaned_sessions

            failed = None
            try:
                sessions = restore_orphaned_sessions(host, constants.state_dir("sessions"), target_spec(args.target))
            except HarnessError as e:   # the rest was undone; the PCI journals below are replayed all the same
                sessions, failed = [], e
            for sid, n in sessions:
                print(f"crashed session {sid}: {n} recorded change(s) undone (registrations, podman settings and services, containers and Kata VMs, boot loader files)")
            done = restore_orphans(host, include_kept=True)
            for owner, n in done:
                print(f"journal {owner}: {n} change(s) undone")
            from .lease import LeasePool

            LeasePool(host).held()      # drops the records of leases whose holder died
            if failed is not None:
                raise failed
            if not done and not sessions:
                print("no orphaned journal or crashed session: nothing to restore")
    finally:
        close()
    return 0


# -- doctor ----------------------------------------------------------------------------------------
def doctor_checks(host: Host, profile: Profile) -> list[Check]:
    """The prerequisite Checks (vfiotest.prereqs): the same ones the host_prereqs suite asserts
    (with the Kata version a session would drive: a bundle or Kata 1.x wants cgroup v1)."""
    from .kata.bundle import bundle_source

    facts = prereqs.gather(host)
    kata = prereqs.kata_major(facts.get("kata_runtime"), bundle_source()[0])
    return prereqs.check_all(facts, read_inventory(host), profile, kata)


def cmd_doctor(args: argparse.Namespace) -> int:
    host, close, profile = _opened(args)
    try:
        checks = doctor_checks(host, profile)
    finally:
        close()
    if args.json:
        print(json.dumps([{"status": c.status, "check": c.name, "detail": c.seen, "fix": c.fix,
                           "kernel_args": c.kernel_args} for c in checks], indent=1))
    else:
        for c in checks:
            print(c.line())
        args_needed = prereqs.missing_kernel_args(checks)
        if args_needed:
            from .kernelargs import fix_command

            if target_spec(args.target) == "virtual":
                from .runner import Runner

                fix = fix_command(args_needed, emulated=True, grub_path=Runner.default().grub_path)
            else:
                fix = fix_command(args_needed)
            print(f"kernel arguments to add: {' '.join(args_needed)}: {fix}")
    return 1 if any(c.status == prereqs.MISSING for c in checks) else 0


# -- registration ------------------------------------------------------------------------------------
ADDRESS_HELP = "PCI address, DDDD:BB:DD.F or BB:DD.F (domain 0000), e.g. 0000:01:10.0"


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("devices", help="list the target's PCI devices (table or --json)", formatter_class=fmt,
                       description="List every PCI device of the target in one round trip: vendor:device, class,\n"
                                   "driver, driver_override, IOMMU group (and its size), /dev/vfio node, SR-IOV\n"
                                   "VF count/total, network interfaces, and notes: allowed by the profile,\n"
                                   "protected (default route, SSH session, mounted filesystem), leased, VF of.")
    add_target_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("bind", help="bind a device (or its whole IOMMU group) to vfio-pci", formatter_class=fmt,
                       description="Bind a device to vfio-pci with driver_override + unbind + drivers_probe\n"
                                   "(new_id on kernels without driver_override), then check the driver link and\n"
                                   "that /dev/vfio/<group> is a char device. Refused (nothing changes) for a\n"
                                   "device outside the profile's allowlist, one the host needs, an SR-IOV PF\n"
                                   "with VFs enabled, or one whose group holds other devices (use --group):\n"
                                   "exit 3. A device whose group (or PF) a test or session holds: exit 7, naming\n"
                                   "the holder. The original driver is journaled on the target first:\n"
                                   "`vfiotest unbind ADDR` puts it back. On the emulated runner, start it first\n"
                                   "(`vfiotest runner up`): a runner booted for this command would stop with it.")
    add_target_argument(p)
    p.add_argument("address", metavar="ADDR", help=ADDRESS_HELP)
    p.add_argument("--group", action="store_true", help="bind every device of ADDR's IOMMU group (bridges are left alone)")
    p.set_defaults(func=cmd_bind)

    p = sub.add_parser("unbind", help="put a device back on the driver it had before `bind`", formatter_class=fmt,
                       description="Put ADDR back as the journal recorded it (original driver, or none, and its\n"
                                   "driver_override cleared). Without a journal entry, a device on vfio-pci is\n"
                                   "released and probed for its native driver (same safety checks as bind).\n"
                                   "A device whose group (or PF) a test or session holds is left alone: exit 7.")
    add_target_argument(p)
    p.add_argument("address", metavar="ADDR", help=ADDRESS_HELP)
    p.set_defaults(func=cmd_unbind)

    p = sub.add_parser("restore", help="undo what crashed or finished runs left (orphaned journals)", formatter_class=fmt,
                       description="Replay every journal on the target whose process is gone (after a crash or\n"
                                   "kill -9), newest change first: drivers, driver_override, new_id, VF counts,\n"
                                   "what a killed `vfiotest probe` made (podman's drop-in, its API service, its\n"
                                   "container), and the CLI's journal: `vfiotest bind`'s binds and what\n"
                                   "`vfiotest kata register` replaced. Before that, undo what crashed test\n"
                                   "sessions on this target recorded on this machine (the kata-vfio registration,\n"
                                   "podman's drop-in, their podman API services, their containers with their\n"
                                   "Kata VMs, the boot loader files --allow-reboot edited; $VFIOTEST_STATE_DIR).\n"
                                   "Journals and sessions still running are left alone. With ADDR, only that device.\n"
                                   "A corrupt journal or one from another host is refused with the way out.")
    add_target_argument(p, PROFILE_UNUSED)
    p.add_argument("address", metavar="ADDR", nargs="?", help=ADDRESS_HELP + " (default: everything)")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("doctor", help="report whether the target can run the suites", formatter_class=fmt,
                       description="Check the prerequisites: IOMMU on and groups present, kernel arguments of the\n"
                                   "profile, interrupt remapping, cgroup mode, SELinux, vfio modules, memlock,\n"
                                   "podman and kata-runtime versions, SR-IOV PFs of the profile, each with the\n"
                                   "fix when it is missing. The host_prereqs suite asserts the same checks. Exit 1 when a\n"
                                   "check is missing ('info' lines are for reading).")
    add_target_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    p.set_defaults(func=cmd_doctor)


__all__ = ["register", "doctor_checks"]
