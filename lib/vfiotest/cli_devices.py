"""`vfiotest devices | bind | unbind | restore | doctor`: the device layer from the command line."""

import argparse
import json
import sys

from .bind import VFIO_DRIVER, DeviceManager, restore_driver, restore_entries
from .cli import add_target_argument

from .journal import Journal, orphaned_journals, restore_orphans
from .lease import LeasePool
from .pci import PciAddress, read_inventory
from .profiles import get_profile
from .targets import default_profile, open_host, target_spec

CLI_OWNER = "cli"  # the journal of manual binds: kept until `vfiotest unbind`/`restore`


def _opened(args):
    """(host, close, profile) for --target/--profile; the profile is checked before connecting."""
    spec = target_spec(args.target)
    profile = get_profile(default_profile(spec, args.profile))
    host, close = open_host(spec, progress=lambda m: print(m, file=sys.stderr))
    return host, close, profile


def _cli_journal(host):
    return Journal.open(host, CLI_OWNER, keep=True, wait=30)


# -- devices ---------------------------------------------------------------------------------
def cmd_devices(args):
    host, close, profile = _opened(args)
    try:
        inv = read_inventory(host)
        leases = LeasePool(host).held()
    finally:
        close()
    rows = []
    for a, d in sorted(inv.devices.items()):
        notes = []
        if a in inv.protected:
            notes.append("protected: " + inv.protected[a])
        elif profile.allows(d.vendor_device):
            notes.append("allowed")
        if d.iommu_group in leases:
            notes.append(f"leased by pid {leases[d.iommu_group].get('pid', '?')}")
        if d.physfn:
            notes.append(f"VF of {d.physfn}")
        rows.append({"address": a, "id": d.vendor_device, "class": d.pci_class, "driver": d.driver,
                     "driver_override": d.driver_override, "iommu_group": d.iommu_group,
                     "group_size": len(inv.groups.get(d.iommu_group or "", [])) or None,
                     "vfio_node": inv.vfio.get(d.iommu_group or ""),
                     "sriov": {"numvfs": d.sriov.numvfs, "totalvfs": d.sriov.totalvfs,
                               "drivers_autoprobe": d.sriov.drivers_autoprobe} if d.sriov else None,
                     "physfn": d.physfn, "net": d.net, "protected": inv.protected.get(a),
                     "allowed": profile.allows(d.vendor_device), "notes": notes})
    if args.json:
        print(json.dumps({"profile": profile.name, "identity": inv.identity, "devices": rows}, indent=1))
        return 0
    head = ("ADDRESS", "ID", "CLASS", "DRIVER", "OVERRIDE", "GROUP", "/DEV/VFIO", "SR-IOV", "NET", "NOTES")
    table = [head]
    for r in rows:
        table.append((r["address"], r["id"], r["class"], r["driver"] or "-", r["driver_override"] or "-",
                      f"{r['iommu_group']}" + (f" ({r['group_size']})" if (r["group_size"] or 0) > 1 else "")
                      if r["iommu_group"] is not None else "-",
                      r["vfio_node"] or "-",
                      f"{r['sriov']['numvfs']}/{r['sriov']['totalvfs']}" if r["sriov"] else "-",
                      ",".join(r["net"]) or "-", "; ".join(r["notes"])))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head) - 1)]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    print(f"\nprofile {profile.name}; host {inv.identity.get('hostname')}; "
          f"{len(inv.devices)} devices, {len(inv.groups)} IOMMU groups")
    return 0


# -- bind / unbind / restore ---------------------------------------------------------------------
def cmd_bind(args):
    address = PciAddress(args.address)  # a malformed address fails before anything is opened
    host, close, profile = _opened(args)
    try:
        with _cli_journal(host) as journal:
            dm = DeviceManager(host, profile, journal)
            bound = dm.bind_group(address) if args.group else [dm.bind_device(address)]
            inv = dm.inventory()
    finally:
        close()
    group = inv.device(address).iommu_group
    for a in bound:
        print(f"{a} is on {VFIO_DRIVER}")
    print(f"IOMMU group {group}: /dev/vfio/{group} ({inv.vfio.get(group, 'missing')})")
    print("undo with: vfiotest unbind " + address + (" (each device of the group)" if len(bound) > 1 else ""))
    return 0


def _restore_address(host, profile, address):
    """Undo what journals (the CLI's and orphans) recorded for `address`; returns what was done."""
    done = []
    journals = [j for j in orphaned_journals(host, include_kept=True)]
    try:
        for j in journals:
            entries = [e for e in j.entries() if e.get("address") == address]
            if entries:
                restore_entries(host, j, entries)
                done.append(f"restored {address} from journal {j.owner}")
    finally:
        for j in journals:
            j.close()
    return done


def cmd_unbind(args):
    address = PciAddress(args.address)
    host, close, profile = _opened(args)
    try:
        inv = read_inventory(host)
        dev = inv.device(address)
        done = _restore_address(host, profile, address)
        if not done:
            if dev.driver != VFIO_DRIVER and not dev.driver_override:
                print(f"{address} is on {dev.driver or 'no driver'} and no journal records a change: nothing to do")
                return 0
            # bound by hand, outside vfiotest: give it to its native driver, with the same safety checks
            dm = DeviceManager(host, profile)
            dm.check_device(inv, address)
            restore_driver(host, address, None, None)
            host.write_text("/sys/bus/pci/drivers_probe", address)
            done.append(f"{address} released from {VFIO_DRIVER} (no journal entry: probed for its native driver)")
        after = read_inventory(host).device(address)
    finally:
        close()
    print("\n".join(done))
    print(f"{address} is now on {after.driver or 'no driver'}")
    return 0


def cmd_restore(args):
    address = PciAddress(args.address) if args.address else None
    host, close, profile = _opened(args)
    try:
        if address:
            done = _restore_address(host, profile, address)
            print("\n".join(done) or f"no journal records a change to {address}: nothing to do")
        else:
            done = restore_orphans(host, include_kept=True)
            for owner, n in done:
                print(f"journal {owner}: {n} change(s) undone")
            if not done:
                print("no orphaned journal: nothing to restore")
    finally:
        close()
    return 0


# -- doctor ----------------------------------------------------------------------------------------
DOCTOR_SCRIPT = r"""
import json, os, resource, subprocess, sys
R = sys.argv[1]
def rd(p):
    try:
        with open(R + p) as f: return f.read()
    except OSError: return None
def ls(p):
    try: return sorted(os.listdir(R + p))
    except OSError: return None
out = {"cmdline": (rd("/proc/cmdline") or "").strip(), "groups": len(ls("/sys/kernel/iommu_groups") or []),
       "iommu_class": ls("/sys/class/iommu") or [],
       "ir": "IR-" in (rd("/proc/interrupts") or ""),
       "unsafe_interrupts": (rd("/sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts") or "").strip(),
       "selinux": (rd("/sys/fs/selinux/enforce") or "").strip() or None,
       "modules": {m: os.path.isdir(R + "/sys/module/" + m) for m in ("vfio", "vfio_pci", "vfio_iommu_type1")},
       "vfio_driver": os.path.isdir(R + "/sys/bus/pci/drivers/vfio-pci"),
       "memlock": resource.getrlimit(resource.RLIMIT_MEMLOCK)[0], "kernel": os.uname().release, "tools": {}}
mounts = [l.split() for l in (rd("/proc/mounts") or "").splitlines() if len(l.split()) > 2]
cg = {m[1]: m[2] for m in mounts if m[1].startswith("/sys/fs/cgroup")}
top = cg.get("/sys/fs/cgroup")
out["cgroup"] = "v2" if top == "cgroup2" else ("hybrid" if "/sys/fs/cgroup/unified" in cg else ("v1" if top else "unknown"))
if not R:
    for tool in ("podman", "kata-runtime"):
        try:
            p = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=15)
            out["tools"][tool] = (p.stdout or p.stderr).strip().splitlines()[0] if p.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            out["tools"][tool] = None
print(json.dumps(out))
"""


def doctor_checks(host, profile):
    """[(status, check, detail)] with status OK, WARN or FAIL."""
    facts = host.python(DOCTOR_SCRIPT, [host.sysroot], timeout=60, check=True, what="doctor checks").json()
    inv = read_inventory(host)
    checks = []

    def add(ok, name, detail, bad="FAIL"):
        checks.append(("OK" if ok else bad, name, detail))

    iommu_arg = any(a in facts["cmdline"].split() for a in ("intel_iommu=on", "amd_iommu=on")) or "amd_iommu" not in facts["cmdline"]
    add(facts["groups"] > 0, "IOMMU", f"{facts['groups']} IOMMU groups" if facts["groups"] else
        "no IOMMU groups: enable VT-d/AMD-Vi in firmware and boot with intel_iommu=on")
    add(all(a in facts["cmdline"].split() for a in profile.kernel_args), "kernel arguments",
        f"want {' '.join(profile.kernel_args)}; have: {facts['cmdline'] or '?'}", "WARN")
    add(facts["ir"] or facts["unsafe_interrupts"] in ("Y", "1"), "interrupt remapping",
        "on (IR- interrupts)" if facts["ir"] else
        ("off, but vfio_iommu_type1 allow_unsafe_interrupts=1" if facts["unsafe_interrupts"] in ("Y", "1") else
         "not seen: VFIO refuses devices without it unless vfio_iommu_type1 allow_unsafe_interrupts=1"), "WARN")
    cg = facts["cgroup"]
    want = profile.cgroup_mode
    add(want == "any" or cg == want or (want == "v1" and cg == "hybrid"), "cgroup mode",
        f"{cg} (profile {profile.name} wants {want})", "WARN")
    se = facts["selinux"]
    add(se != "1", "SELinux", {"1": "enforcing: the seed needs permissive (setenforce 0)", "0": "permissive",
                               None: "disabled"}[se if se in ("0", "1") else None], "WARN")
    mods = facts["modules"]
    add(facts["vfio_driver"], "vfio modules",
        ", ".join(f"{m} {'loaded' if v else 'not loaded'}" for m, v in mods.items())
        + ("" if facts["vfio_driver"] else " (bind runs modprobe vfio-pci)"), "WARN")
    ml = facts["memlock"]
    add(ml == -1 or ml >= 64 << 20, "memlock", "unlimited" if ml == -1 else f"{ml >> 10} KiB for this user "
        "(containers need CAP_IPC_LOCK and enough memlock to map guest RAM)", "WARN")
    for tool, version in facts["tools"].items():
        add(version is not None, tool, version or "not found on the target", "WARN")
    pfs = [d for d in inv.devices.values() if d.sriov and profile.allows(d.vendor_device) and d.address not in inv.protected]
    add(bool(pfs), "SR-IOV PFs", ", ".join(f"{d.address} {d.vendor_device} ({d.sriov.numvfs}/{d.sriov.totalvfs} VFs)"
                                           for d in pfs) or f"none of the {profile.name} profile's IDs")
    checks.append(("OK", "kernel", facts["kernel"]))
    return checks


def cmd_doctor(args):
    host, close, profile = _opened(args)
    try:
        checks = doctor_checks(host, profile)
    finally:
        close()
    if args.json:
        print(json.dumps([{"status": s, "check": c, "detail": d} for s, c, d in checks], indent=1))
    else:
        w = max(len(c) for _, c, _ in checks)
        for s, c, d in checks:
            print(f"{s:<4}  {c:<{w}}  {d}")
    return 1 if any(s == "FAIL" for s, _, _ in checks) else 0


# -- registration ------------------------------------------------------------------------------------
ADDRESS_HELP = "PCI address, DDDD:BB:DD.F or BB:DD.F (domain 0000), e.g. 0000:01:10.0"


def register(sub):
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
                                   "device outside the profile's allowlist, one the host needs, or one whose\n"
                                   "group holds other devices (use --group). The original driver is journaled\n"
                                   "on the target first: `vfiotest unbind ADDR` puts it back.")
    add_target_argument(p)
    p.add_argument("address", metavar="ADDR", help=ADDRESS_HELP)
    p.add_argument("--group", action="store_true", help="bind every device of ADDR's IOMMU group (bridges are left alone)")
    p.set_defaults(func=cmd_bind)

    p = sub.add_parser("unbind", help="put a device back on the driver it had before `bind`", formatter_class=fmt,
                       description="Put ADDR back as the journal recorded it (original driver, or none, and its\n"
                                   "driver_override cleared). Without a journal entry, a device on vfio-pci is\n"
                                   "released and probed for its native driver (same safety checks as bind).")
    add_target_argument(p)
    p.add_argument("address", metavar="ADDR", help=ADDRESS_HELP)
    p.set_defaults(func=cmd_unbind)

    p = sub.add_parser("restore", help="undo what crashed or finished runs left (orphaned journals)", formatter_class=fmt,
                       description="Replay every journal on the target whose process is gone (after a crash or\n"
                                   "kill -9), newest change first: drivers, driver_override, new_id, VF counts.\n"
                                   "Journals of running sessions are left alone. With ADDR, only that device.\n"
                                   "A corrupt journal or one from another host is refused with the way out.")
    add_target_argument(p)
    p.add_argument("address", metavar="ADDR", nargs="?", help=ADDRESS_HELP + " (default: everything)")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("doctor", help="report whether the target can run the suites", formatter_class=fmt,
                       description="Check the prerequisites: IOMMU on and groups present, kernel arguments of the\n"
                                   "profile, interrupt remapping, cgroup mode, SELinux, vfio modules, memlock,\n"
                                   "podman and kata-runtime versions, SR-IOV PFs of the profile. Exit 1 when a\n"
                                   "check FAILs (WARN does not).")
    add_target_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    p.set_defaults(func=cmd_doctor)


__all__ = ["register", "doctor_checks", "CLI_OWNER"]
