"""SR-IOV virtual functions: create N VFs on a PF, and put the original count back.

The kernel refuses N -> M with both non-zero (EBUSY), so a change writes 0
first. Some PF drivers block in that write for minutes: every write has a
timeout. `sriov_drivers_autoprobe` decides whether new VFs get their native
driver; it is set when asked and recorded. The journal entry is written before
the first change. A PF whose VFs are in use (bound to vfio-pci, or leased) is
refused, as is a count over sriov_totalvfs; in both cases nothing changes.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from . import constants, nic_vf, nvme_virt
from .errors import ENVIRONMENT, CommandTimeout, DeviceNotFound, NotAllowed, UnbindError, VFCreateError
from .host import Host
from .lease import Lease, LeasePool, covers
from .pci import Inventory, PciAddress, read_inventory

SYS_DEV = "/sys/bus/pci/devices"
WRITE_TIMEOUT = 120.0
SETTLE_TIMEOUT = 30.0
#: held (on the target) while a session decides whether a PF's VF count is its to create or put
#: back, so that two sessions sharing a runner do not both create, or both leave, the same VFs
COUNT_LOCK = f"{constants.TARGET_STATE_DIR}/numvfs.lock"
COUNT_LOCK_TIMEOUT = 300.0


def pf_lease_name(pf: str) -> str:
    """The lease (vfiotest.lease) that whoever changes `pf`'s VF count, or binds the PF, holds."""
    return f"pf-{pf}"


def vfs_in_use(host: Host, inv: Inventory, pf: str, leases: LeasePool | None = None) -> list[str]:
    """Reasons the VFs of `pf` cannot be removed: bound to vfio-pci, or leased (a lease on the
    VF's group number that was taken for other devices, before the number was freed and given
    to this VF's group, does not count: lease.covers)."""
    reasons = []
    vfs = inv.vfs_of(pf)
    for vf in vfs:
        if vf.driver == "vfio-pci":
            reasons.append(f"VF {vf.address} is bound to vfio-pci")
    if any(vf.iommu_group for vf in vfs):
        pool = leases if leases is not None else LeasePool(host)
        for g, owner in pool.held().items():
            for vf in vfs:
                if covers(g, owner, vf.address, vf.iommu_group):
                    reasons.append(f"VF {vf.address} (IOMMU group {g}) is leased by pid {owner.get('pid', '?')}"
                                   f"{' for ' + owner['test'] if owner.get('test') else ''}")
    return reasons


def hold_vfs(host: Host, pool: LeasePool, pf: str, test_id: str | None = None) -> list[Lease] | None:
    """The lease of `pf` (pf_lease_name) and of each of its VFs' IOMMU groups, each naming its
    VF, for a caller that changes the PF's VF count on purpose; None (and nothing held) when
    another process holds any of them. The groups are read once the PF lease is held: under
    it, no one else changes the count, so the numbers stay those VFs' until the caller does."""
    own = pool.try_acquire(pf_lease_name(pf), test_id=test_id)
    if own is None:
        return None
    leases = [own]
    for vf in read_inventory(host).vfs_of(pf):
        if not vf.iommu_group:
            continue
        lease = pool.try_acquire(vf.iommu_group, test_id=test_id, devices=[vf.address])
        if lease is None:
            for held in leases:
                held.release()
            return None
        leases.append(lease)
    return leases


def timed_write(host: Host, path: str, data: str, timeout: float) -> None:
    """host.write_text with a deadline: every transport bounds its writes (remote ones by the
    agent call's timeout, the local one by abandoning a write(2) that blocks, host.LocalTransport)."""
    host.write_text(path, data, timeout=timeout)


def _write_numvfs(host: Host, pf: str, n: int, timeout: float) -> None:
    path = f"{SYS_DEV}/{pf}/sriov_numvfs"
    try:
        timed_write(host, path, str(n), timeout)
    except CommandTimeout:
        raise VFCreateError(f"writing {n} to {path} did not return within {timeout:.0f} s",
                            hint="some PF drivers block for minutes; the write may still be pending in the kernel: "
                                 "look at dmesg on the target, then run `vfiotest restore`",
                            address=pf, path=path, reason=VFCreateError.TIMEOUT) from None
    except OSError as e:
        hints = {errno.EBUSY: "VFs already exist: the count must go to 0 first (set_numvfs does that)",
                 errno.ERANGE: "ask for at most sriov_totalvfs VFs",
                 errno.ENOENT: "the PF needs its own driver bound to create VFs (`vfiotest devices`)",
                 errno.ENOMEM: "the PF has no room for that many VFs (BIOS SR-IOV / PCI resources)"}
        raise VFCreateError(f"writing {n} to {path} failed: {e.strerror} (errno {e.errno})",
                            hint=hints.get(e.errno or 0, "look at dmesg on the target"),
                            address=pf, path=path, errno=e.errno, cause=e) from None


def wait_virtfns(host: Host, pf: str, n: int, timeout: float = SETTLE_TIMEOUT) -> list[PciAddress]:
    """Wait until `pf` has exactly virtfn0..virtfn{n-1}, each naming an existing device.
    Returns the VF addresses in order."""
    deadline = time.monotonic() + timeout
    while True:
        names = [x for x in host.listdir(f"{SYS_DEV}/{pf}") or [] if x.startswith("virtfn")]
        if len(names) == n:
            vfs = [host.readlink(f"{SYS_DEV}/{pf}/virtfn{i}") for i in range(n)]
            if all(vfs):
                addrs = [PciAddress(v.rsplit("/", 1)[-1]) for v in vfs if v]
                if all(host.exists(f"{SYS_DEV}/{a}") for a in addrs):
                    return addrs
        if time.monotonic() >= deadline:
            raise VFCreateError(f"{pf} has {len(names)} virtfn links, expected {n}, after {timeout:.0f} s",
                                hint="look at dmesg on the target; the PF driver may have refused some VFs",
                                address=pf)
        time.sleep(0.05)


def set_numvfs(host: Host, pf: str, n: int, journal: Any = None, timeout: float = WRITE_TIMEOUT,
               autoprobe: bool | None = None, profile: Any = None, leases: LeasePool | None = None,
               settle: float = SETTLE_TIMEOUT) -> list[PciAddress]:
    """Give `pf` exactly `n` VFs; returns their addresses.

    journal: recorder for the original count (written before any change).
    autoprobe: True/False sets sriov_drivers_autoprobe first (None leaves it).
    An NVMe PF whose secondary controllers need virtualization management gets them brought
    up (vfiotest.nvme_virt: resources, online; autoprobe off while the VFs are made, then as
    asked, the VFs probed), each controller journaled before it is changed. A NIC PF's netdev
    is brought up (journaled, vfiotest.nic_vf) before its VFs are made. VFs already there
    (n equal to the count) whose controllers are offline are brought up the same way, in place.
    profile: when given, the PF must be allowed by it and not needed by the host.
    leases: the LeasePool that says whether VFs are in use (default: the host's)."""
    pf = PciAddress(pf)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise VFCreateError(f"{n!r} is not a VF count for {pf}", hint="give a whole number from 0 to sriov_totalvfs",
                            address=pf)
    inv = read_inventory(host)
    dev = inv.device(pf)
    if dev.sriov is None:
        raise VFCreateError(f"{pf} ({dev.vendor_device}) is not an SR-IOV PF (it has no sriov_totalvfs)",
                            hint="pick a PF from `vfiotest devices` (the SR-IOV column)",
                            address=pf, reason=VFCreateError.NOT_PF)
    if profile is not None:
        if inv.protected.get(pf):
            raise NotAllowed(f"{pf} {inv.protected[pf]}: its VFs will not be changed",
                             hint="use a PF that carries no route, SSH session or mounted filesystem",
                             address=pf, cause=inv.protected[pf], reason=NotAllowed.PROTECTED)
        if not profile.allows(dev.vendor_device):
            raise NotAllowed(f"{pf} ({dev.vendor_device}) is not in the {profile.name} profile's allowlist",
                             hint=f"allowed IDs: {', '.join(sorted(profile.ids))}",
                             address=pf, reason=NotAllowed.NOT_ALLOWLISTED)
    total, cur = dev.sriov.totalvfs, dev.sriov.numvfs
    if n > total:
        raise VFCreateError(f"{pf} can have at most {total} VFs (sriov_totalvfs), {n} were asked for; nothing was changed",
                            hint=f"ask for {total} or fewer (--numvfs)", address=pf, reason=VFCreateError.TOO_MANY)
    if n == cur and (autoprobe is None or autoprobe == dev.sriov.drivers_autoprobe):
        vfs = [vf.address for vf in inv.vfs_of(pf)]
        # VFs made by someone else (another session, the user) whose NVMe controllers are offline:
        # online in place, those with no driver or vfio-pci only (a kernel driver on a controller
        # that changes state may give up and unbind); drivers are left as found (a bind here
        # would not be undone)
        existing = nvme_virt.plan(host, pf, n)
        if existing is not None:
            free = {i + 1 for i, made in enumerate(inv.vfs_of(pf)) if made.driver in (None, "vfio-pci")}
            existing = dataclasses.replace(existing, controllers=tuple(c for c in existing.controllers if c.vfn in free))
            nvme_virt.assign(host, existing, journal)
            nvme_virt.online(host, existing)
        return vfs
    if cur and n != cur:
        busy = vfs_in_use(host, inv, pf, leases)
        if busy:
            raise VFCreateError(f"{pf} has VFs in use, its VF count stays {cur}: " + "; ".join(busy),
                                hint="release them first (end the tests using them, `vfiotest restore`), then retry",
                                address=pf, cause="; ".join(busy), reason=VFCreateError.IN_USE)
    if not dev.driver:
        raise VFCreateError(f"{pf} has no driver bound; the kernel creates VFs through the PF's driver",
                            hint="put the PF back on its driver (`vfiotest unbind` / `vfiotest restore`)",
                            address=pf, reason=VFCreateError.NO_DRIVER)
    entry = {"kind": "numvfs", "address": pf, "numvfs": cur, "drivers_autoprobe": dev.sriov.drivers_autoprobe}
    if journal is not None:
        entry = journal.record(entry)
    bringup = None
    if n != cur and cur:
        _write_numvfs(host, pf, 0, timeout)
        wait_virtfns(host, pf, 0, settle)
    if n != cur:
        # NVMe secondary controllers that need virtualization management, read with the VFs at 0
        # (disabling VFs may have put controllers offline); None: none do
        bringup = nvme_virt.plan(host, pf, n)
    want_ap = dev.sriov.drivers_autoprobe if autoprobe is None else autoprobe
    # no driver may probe a VF before its controller is online: autoprobe off while they are made
    during_ap = False if bringup is not None else want_ap
    if during_ap != dev.sriov.drivers_autoprobe:
        host.write_text(f"{SYS_DEV}/{pf}/sriov_drivers_autoprobe", "1" if during_ap else "0")
    if n != cur:
        if bringup is not None:
            nvme_virt.assign(host, bringup, journal)
        if n:
            # a NIC VF's driver talks to the PF through a mailbox the PF answers only while its
            # netdev is up; up before the VFs exist, so that the PF's reset at VF creation
            # leaves it answering (docs/nic-traffic.md, section 2)
            nic_vf.link_up(host, pf, journal)
        _write_numvfs(host, pf, n, timeout)
    vfs = wait_virtfns(host, pf, n, settle)
    if bringup is not None:
        nvme_virt.online(host, bringup)
        if want_ap:
            host.write_text(f"{SYS_DEV}/{pf}/sriov_drivers_autoprobe", "1")
            for vf in vfs:  # what autoprobe would have done at creation
                host.write_text(f"{SYS_DEV.rsplit('/', 1)[0]}/drivers_probe", vf)
    return vfs


def restore_numvfs(host: Host, entry: dict[str, Any], timeout: float = WRITE_TIMEOUT, settle: float = SETTLE_TIMEOUT,
                   leases: LeasePool | None = None) -> None:
    """Put a PF back to the VF count and autoprobe setting of a journal entry."""
    pf = PciAddress(entry["address"])
    try:
        inv = read_inventory(host)
        dev = inv.device(pf)
    except DeviceNotFound:
        return
    if dev.sriov is None:
        return
    want_ap = entry.get("drivers_autoprobe")
    if want_ap is not None and want_ap != dev.sriov.drivers_autoprobe:
        host.write_text(f"{SYS_DEV}/{pf}/sriov_drivers_autoprobe", "1" if want_ap else "0")
    want, cur = int(entry["numvfs"]), dev.sriov.numvfs
    if want == cur:
        return
    if cur:
        busy = vfs_in_use(host, inv, pf, leases)
        if busy:
            raise UnbindError(f"cannot put {pf} back to {want} VFs: " + "; ".join(busy),
                              hint="release those VFs, then run `vfiotest restore` again",
                              address=pf, cause="; ".join(busy), reason=VFCreateError.IN_USE)
        _write_numvfs(host, pf, 0, timeout)
        wait_virtfns(host, pf, 0, settle)
    if want:
        _write_numvfs(host, pf, want, timeout)
    wait_virtfns(host, pf, want, settle)


# The journal entry kind this module owns; vfiotest.journal registers it (journal.KIND_MODULES).
JOURNAL_KINDS: list[dict[str, Any]] = [{"kind": "numvfs", "required": ("address", "numvfs"), "undo": restore_numvfs}]

__all__ = ["COUNT_LOCK", "hold_vfs", "pf_lease_name", "set_numvfs", "restore_numvfs", "vfs_in_use", "wait_virtfns", "timed_write"]


def shared_counts(host: Host, own: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """{PF: (owner, its numvfs entry)} for the VF counts that live journals on `host` other than
    `own` record: sessions sharing the runner that made VFs. A session using those VFs records
    the same entry in its own journal (the original count), and the last one to end puts it back."""
    from .journal import live_journals

    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for owner, entries in sorted(live_journals(host, exclude=(own,)).items()):
        for e in entries:
            if e.get("kind") == "numvfs" and e.get("address"):
                out.setdefault(e["address"], (owner, dict(e)))
    return out


@dataclass
class SriovPf:
    """A PF with the VFs a session gave it."""

    address: PciAddress
    vendor_device: str
    driver: str | None
    vfs: list[PciAddress]
    #: the PF's network interfaces and their administrative state ("up"/"down", IFF_UP: what the
    #: harness sets; the carrier follows the link partner, on its own time) once the VFs were made
    link: dict[str, str]


class SessionVfs:
    """The VF counts of one test session: its PFs given `numvfs` VFs once per session (by its
    first process; the others read what it made), each original count journaled in the
    session journal before it changes. That journal stays open, and live, until close(); the
    session's finish() puts the counts back after every process is done (vfiotest.session).
    A session owns one (Session.vf_counts); the sriov layer asks it for the PFs."""

    CREATED = "sriov-created"     # in the session directory: the first process made the VFs

    def __init__(self, session: Any, host: Host, profile: Any, leases: LeasePool) -> None:
        self.session, self.host, self.profile, self.leases = session, host, profile, leases
        self._journal: Any = None

    def provide(self, pfs: list[Any], numvfs: int, progress: Callable[[str], None] = lambda s: None) -> list[SriovPf]:
        """`pfs` (pci Devices) with min(numvfs, sriov_totalvfs) VFs each. HarnessError (typed:
        VFCreateError, LeaseBusy...) when a count cannot be had; the journal records what was done."""
        from .journal import Journal

        out = []
        with self.session.lock("sriov"):
            first = not os.path.exists(self.session.path(self.CREATED))
            if first and self._journal is None:
                # the session journal stays live (journal.session_alive) until the session ends,
                # so no other session takes it for an orphan
                self._journal = Journal.open(self.host, owner=self.session.journal_owner, wait=60,
                                             session=self.session.journal_meta)
            journal = self._journal if first else None
            count_lock = self.host.hold_lock(COUNT_LOCK, blocking=True, timeout=COUNT_LOCK_TIMEOUT)
            if count_lock is None:
                raise VFCreateError(f"another process on {self.host.name} held {COUNT_LOCK} for "
                                    f"{COUNT_LOCK_TIMEOUT:.0f} s (a session creating or putting back VFs)",
                                    hint="`vfiotest devices` shows who holds the PFs; wait for that session, "
                                         "or `vfiotest restore` if it crashed", category=ENVIRONMENT)
            try:
                shared = shared_counts(self.host, self.session.journal_owner) if journal else {}
                for pf in pfs:
                    n = min(numvfs, pf.sriov.totalvfs) if pf.sriov else numvfs
                    if journal is not None:
                        progress(f"{pf.address} ({pf.vendor_device}): {n} VFs")
                        if pf.address in shared:
                            # another live session made these VFs: its original count is ours to put
                            # back too, should that session end first (Session.finish leaves it to us)
                            journal.record(shared[pf.address][1])
                    # a test changing this PF's VF count on purpose (rebind's whole_pf) holds this lease
                    with self.leases.wait_acquire(pf_lease_name(pf.address), test_id="sriov layer"):
                        vfs = set_numvfs(self.host, pf.address, n, journal=journal, profile=self.profile,
                                         leases=self.leases)
                    out.append(SriovPf(pf.address, pf.vendor_device, pf.driver, list(vfs),
                                       {i: "up" if nic_vf.is_up(self.host, i) else "down"
                                        for i in pf.net}))
            finally:
                count_lock.release()
            open(self.session.path(self.CREATED), "w").close()
        return out

    def close(self) -> None:
        """Let go of the session journal; its entries stay for the session's finish()."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None
