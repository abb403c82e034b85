"""The guest hook: an OCI prestart hook that binds the container's devices to vfio-pci.

Runs inside the Kata guest with the standard library only (python3 and the
modules shipped next to it in the image: vfiotest.errors, host, pci, bind).
The agent runs it with argv `[name, stage]` (Kata 1.12.1 passes the hook's
basename, e.g. `["vfio-hook", "prestart"]`; a missing stage means prestart)
and the OCI state JSON on stdin (`id`, `pid`, `status`, `bundle`,
`annotations`).

Which devices: the annotation `io.katacontainers.x.vfio` (set by the harness
when it starts a container), read from the state, else from the spec at
`<state bundle>/config.json` (Kata 1.x: /run/kata-containers/shared/containers/
<id>), else from `/run/libcontainer/<id>/config.json`: tokens separated by
commas or spaces, each a `vendor:device` ID (`8086:10ca`) or a guest PCI
address. An empty annotation asks for nothing. Without the annotation: the
profile's vendor:device list from the hook's settings (`allowed_ids`). Never a
virtio device (vendor 1af4), a bridge (class 0x06xx: host, ISA or PCI bridge),
a device the guest itself needs (the inventory's protected set: default-route
NIC, disks of mounted filesystems), nor a device whose IOMMU group holds a
virtio or needed device: such devices are refused (logged as "select"
"refused"). An address the annotation names must be given; an ID it names
must get at least one device (others with that ID may be refused).

A device the annotation asks for may still be on its way (hot-plug): the hook
polls the guest's PCI inventory every 0.25 s until every address asked for
exists and every ID asked for matches at least one device it may bind, for at
most `device_wait` seconds (settings, default 10) and never more than half of
what is left of the hook's timeout, so the binding keeps the other half. The
profile's IDs are not waited for (they are a filter, not a request).

Each selected device's whole IOMMU group is bound with the device layer
(`driver_override` + unbind + `drivers_probe`, verified by the driver link and
`/dev/vfio/<group>`); one group's failure does not stop the others. One JSON
line per action goes to the log under /tmp: `{"time", "epoch", "pid",
"stage", "container", "action", "device", "vendor_device", "old_driver",
"new_driver", "group", "result", "error", "ms"}` with the actions "state",
"start", "wait", "select", "bind", "verify", "end".

Exit codes (a non-zero exit fails the container start in the agent; the
hook's stderr, one `vfio-hook: ...` line per failure, is what the runtime's
error shows):

  0  EXIT_OK           every selected group bound and verified (or already
                       on vfio-pci: "already-bound"), or nothing to do: an
                       empty annotation, or no annotation and no device
                       matching the profile's IDs ("no-devices"; devices the
                       profile's IDs match but refused are skipped)
  2  EXIT_BAD_STATE    the OCI state on stdin is malformed (logged at once)
  3  EXIT_TIMEOUT      the whole run exceeded the hook's `timeout` (SIGALRM)
  4  EXIT_INTERNAL     an unexpected error in the hook itself
  5  EXIT_BIND_FAILED  a selected group (from the annotation or the profile)
                       failed to bind or verify (`vfio-hook: 0000:02:00.0
                       (8086:10ca) could not be bound to vfio-pci: <cause>`),
                       or the annotation asked for what the guest cannot give
                       after the wait: an address that does not exist or is
                       refused, an ID that matches no device or only refused
                       ones (the line names what was asked, the annotation,
                       and lists the guest's devices). The other groups are
                       still bound; the "end" entry says error.
  6  EXIT_BAD_REQUEST  the annotation value is malformed (a token neither
                       vendor:device nor a PCI address); nothing is changed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, TextIO

from vfiotest.constants import VFIO_ANNOTATION
from vfiotest.host import wait_for

if TYPE_CHECKING:
    from types import FrameType

    from vfiotest.host import Host
    from vfiotest.pci import Inventory, PciAddress, PciDevice

ANNOTATION = VFIO_ANNOTATION
DEFAULT_LOG = "/tmp/vfio-hook.log"
DEFAULT_TIMEOUT = 20.0
VIRTIO_VENDOR = "0x1af4"
DEFAULT_DEVICE_WAIT = 10.0   # seconds to wait for a device the annotation asks for (hot-plug)
DEVICE_POLL = 0.25           # seconds between two reads of the inventory while waiting
VFIO_NODE_WAIT = 5.0         # seconds for /dev/vfio/<group> to appear after the bind (udev)
EXIT_OK, EXIT_BAD_STATE, EXIT_TIMEOUT, EXIT_INTERNAL = 0, 2, 3, 4
EXIT_BIND_FAILED, EXIT_BAD_REQUEST = 5, 6
_ID_RE = re.compile(r"^(?:0x)?([0-9a-fA-F]{4}):(?:0x)?([0-9a-fA-F]{4})$")


class BadState(Exception):
    """The OCI state on stdin is not what the runtime spec describes."""


class HookLog:
    """Appends one JSON object per line; one write(2) per line so lines never interleave."""

    def __init__(self, path: str, stage: str, container: str | None = None) -> None:
        self.path, self.stage, self.container = path, stage, container

    def write(self, action: str, result: str, **fields: Any) -> dict[str, Any]:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z", "epoch": round(time.time(), 3),
                 "pid": os.getpid(), "stage": self.stage, "container": self.container, "action": action,
                 "result": result}
        entry.update(fields)
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        try:
            d = os.path.dirname(self.path)
            if d:
                os.makedirs(d, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as e:  # the log is best effort; stderr reaches the agent's log
            sys.stderr.write(f"vfio-hook: cannot write {self.path}: {e}\n")
        return entry


def parse_state(text: str) -> dict[str, Any]:
    """The OCI state as a dict; BadState when it is not a JSON object with an `id`."""
    try:
        state = json.loads(text)
    except ValueError as e:
        raise BadState(f"state on stdin is not JSON: {e}") from None
    if not isinstance(state, dict):
        raise BadState(f"state on stdin is a JSON {type(state).__name__}, not an object")
    if not isinstance(state.get("id"), str) or not state["id"]:
        raise BadState("state on stdin has no container id")
    ann = state.get("annotations", {})
    if ann is not None and not isinstance(ann, dict):
        raise BadState("state annotations are not an object")
    return state


def spec_paths(state: dict[str, Any], spec_root: str = "/run/libcontainer") -> list[str]:
    """Where the container's spec may be, in order: the state's bundle, then the agent's copy."""
    paths = []
    bundle = state.get("bundle")
    if isinstance(bundle, str) and bundle:
        paths.append(os.path.join(bundle, "config.json"))
    paths.append(os.path.join(spec_root, state["id"], "config.json"))
    return paths


def requested(state: dict[str, Any], spec_root: str = "/run/libcontainer") -> str | None:
    """The annotation value (None when the container set none), from the state, else from the spec
    in the state's bundle, else from the agent's copy under `spec_root`."""
    ann = state.get("annotations") or {}
    if ANNOTATION in ann:
        return ann[ANNOTATION]
    for path in spec_paths(state, spec_root):
        try:
            with open(path) as f:
                spec = json.load(f)
            ann = spec.get("annotations") or {}
            if ANNOTATION in ann:
                return ann[ANNOTATION]
        except (OSError, ValueError, AttributeError):
            continue
    return None


def parse_selection(value: str | None) -> tuple[set[str], set[PciAddress]]:
    """(ids, addresses) named by an annotation value; raises ValueError on a bad token."""
    from vfiotest.pci import PciAddress

    ids, addrs = set(), set()
    for tok in re.split(r"[\s,]+", value or ""):
        if not tok:
            continue
        m = _ID_RE.match(tok)
        if m:
            ids.add(f"{m.group(1).lower()}:{m.group(2).lower()}")
        elif PciAddress.is_valid(tok):
            addrs.add(PciAddress(tok))
        else:
            raise ValueError(f"{tok!r} is neither vendor:device nor a PCI address")
    return ids, addrs


def _needed(inv: Inventory, a: str) -> str | None:
    """Why the guest cannot give device `a` away (None when it can)."""
    d = inv.devices[a]
    if d.vendor == VIRTIO_VENDOR:
        return "virtio device (the agent's own)"
    if a in inv.protected:
        return "the guest needs it: " + inv.protected[a]
    return None


def select_devices(inv: Inventory, ids: set[str], addrs: set[PciAddress]
                   ) -> tuple[list[PciDevice], list[tuple[str, str]]]:
    """Devices asked for, and [(address, reason)] of those refused."""
    chosen, refused = [], []
    for a, d in sorted(inv.devices.items()):
        if a in addrs or d.vendor_device in ids:
            why = _needed(inv, a)
            if why is None and (d.pci_class or "").startswith("0x06"):   # host, ISA and PCI bridges
                why = f"a bridge (class {d.pci_class})"
            if why is None:
                for m in inv.group_of(a):
                    if m != a and m in inv.devices and _needed(inv, m):
                        why = (f"IOMMU group {d.iommu_group} also holds {m} ({inv.devices[m].vendor_device}), "
                               "which the guest needs; group left alone")
                        break
            if why is None:
                chosen.append(d)
            else:
                refused.append((a, why))
    for a in sorted(addrs - set(inv.devices)):
        refused.append((a, "no such device in the guest"))
    return chosen, refused


def unmet(inv: Inventory, ids: set[str], addrs: set[PciAddress]) -> tuple[list[str], list[str]]:
    """What of an explicit request the inventory cannot give yet: (absent addresses, IDs without a
    device that may be bound)."""
    chosen, _ = select_devices(inv, ids, addrs)
    return sorted(addrs - set(inv.devices)), sorted(ids - {d.vendor_device for d in chosen})


def guest_devices(inv: Inventory, limit: int = 32) -> str:
    """The guest's PCI devices in one line: `0000:00:01.0 1af4:1000 (virtio-pci), ...`."""
    items = [f"{a} {d.vendor_device} ({d.driver or 'no driver'})" for a, d in sorted(inv.devices.items())]
    more = len(items) - limit
    return ", ".join(items[:limit]) + (f", and {more} more" if more > 0 else "") if items else "no PCI devices"


def wait_for_devices(read: Callable[[], Inventory], inv: Inventory, ids: set[str], addrs: set[PciAddress],
                     until: float, log: HookLog) -> tuple[Inventory, float]:
    """Poll the inventory (`read()`) until the explicit request is met or `until` (monotonic) passes.
    Returns the last inventory and the seconds waited (0 when nothing was missing)."""
    missing = unmet(inv, ids, addrs)
    if not any(missing):
        return inv, 0.0
    t0 = time.monotonic()
    while any(missing):
        left = until - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(DEVICE_POLL, left))
        inv = read()
        missing = unmet(inv, ids, addrs)
    waited = time.monotonic() - t0
    log.write("wait", "ok" if not any(missing) else "incomplete", addresses=missing[0], ids=missing[1],
              ms=round(waited * 1000, 1),
              **({"error": "still missing after the wait"} if any(missing) else {}))
    return inv, waited


def _cause(e: BaseException) -> str:
    """One line saying why: the error's message (and its next step), without the type's noise."""
    msg = getattr(e, "message", None) or str(e) or type(e).__name__
    hint = getattr(e, "hint", None)
    text = f"{msg} (next step: {hint})" if hint else msg
    return " ".join(str(text).split())


def bind_group(host: Host, inv: Inventory, dev: PciDevice, log: HookLog) -> list[str]:
    """Bind the IOMMU group of `dev` to vfio-pci with the device layer; log each device.
    Returns the failures, one human-readable line each ([] when the group is bound and verified)."""
    from vfiotest import bind

    members = [inv.devices[a] for a in inv.group_of(dev.address) if a in inv.devices]
    for m in members:
        if m.vendor == VIRTIO_VENDOR or m.address in inv.protected:   # select_devices refuses these first
            why = f"group {dev.iommu_group} also holds {m.address}, which the guest needs; group left alone"
            log.write("bind", "error", device=m.address, vendor_device=m.vendor_device, old_driver=m.driver,
                      new_driver=m.driver, group=dev.iommu_group, error=why)
            return [f"{dev.address} ({dev.vendor_device}) could not be bound to vfio-pci: {why}"]
    failures = []
    for m in members:
        if m.is_bridge:
            continue
        t0 = time.monotonic()
        if m.driver == "vfio-pci":
            log.write("bind", "already-bound", device=m.address, vendor_device=m.vendor_device, old_driver="vfio-pci",
                      new_driver="vfio-pci", group=m.iommu_group, ms=0)
            continue
        try:
            bind.bind_to_vfio(host, m.address, verify_node=False)
            new = host.readlink(f"/sys/bus/pci/devices/{m.address}/driver")
            log.write("bind", "bound", device=m.address, vendor_device=m.vendor_device, old_driver=m.driver,
                      new_driver=os.path.basename(new) if new else None, group=m.iommu_group,
                      ms=round((time.monotonic() - t0) * 1000, 1))
        except Exception as e:  # one device's failure must not stop the others
            new = host.readlink(f"/sys/bus/pci/devices/{m.address}/driver")
            log.write("bind", "error", device=m.address, vendor_device=m.vendor_device, old_driver=m.driver,
                      new_driver=os.path.basename(new) if new else None, group=m.iommu_group,
                      error=f"{type(e).__name__}: {getattr(e, 'message', None) or e}",
                      ms=round((time.monotonic() - t0) * 1000, 1))
            failures.append(f"{m.address} ({m.vendor_device}) could not be bound to vfio-pci: {_cause(e)}")
    dev_path = f"/dev/vfio/{dev.iommu_group}"
    if failures:   # the device layer put the failed devices back: the node cannot come, do not wait for it
        log.write("verify", "error", device=dev.address, group=dev.iommu_group, path=dev_path,
                  error=f"not checked: {len(failures)} device(s) of group {dev.iommu_group} failed to bind")
        return failures
    # udev makes the node shortly after the last bind
    present = wait_for(lambda: host.exists(dev_path), VFIO_NODE_WAIT, 0.05, dev_path, fail=False)
    log.write("verify", "ok" if present else "error", device=dev.address, group=dev.iommu_group, path=dev_path,
              **({} if present else {"error": f"{dev_path} did not appear"}))
    if not present:
        failures.append(f"{dev.address} ({dev.vendor_device}) could not be bound to vfio-pci: {dev_path} did not "
                        f"appear within {VFIO_NODE_WAIT:g} s of binding IOMMU group {dev.iommu_group}")
    return failures


def load_settings(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _budget(settings: dict[str, Any]) -> float:
    try:
        return float(settings.get("timeout") or DEFAULT_TIMEOUT)
    except (TypeError, ValueError):
        return DEFAULT_TIMEOUT


def say(line: str, err: TextIO | None = None) -> None:
    """One line on stderr, which the agent hands back in the runtime's error."""
    out = err if err is not None else sys.stderr
    try:
        out.write(f"vfio-hook: {line}\n")
        out.flush()
    except (OSError, ValueError):
        pass


def run(stage: str, stdin_text: str, host: Host, settings: dict[str, Any], log_path: str | None = None,
        spec_root: str = "/run/libcontainer", log: HookLog | None = None, deadline: float | None = None,
        err: TextIO | None = None, argv: list[str] | None = None) -> int:
    """The hook's work for one call; returns the exit code (see the module doc). `host` is the guest
    (LocalHost) or a simulated sysfs in tests; `deadline` (time.monotonic()) is when the hook's budget
    runs out (default: the settings' timeout from now); failures go to `err` (default sys.stderr)."""
    from vfiotest import pci

    log = log or HookLog(log_path or settings.get("log") or DEFAULT_LOG, stage)
    t0 = time.monotonic()
    budget = _budget(settings)
    deadline = t0 + budget if deadline is None else deadline

    def elapsed_ms() -> float:
        return round((time.monotonic() - t0) * 1000, 1)

    try:
        state = parse_state(stdin_text)
    except BadState as e:
        log.write("state", "error", error=str(e), stdin=stdin_text[:200])
        say(f"malformed OCI state on stdin: {e}", err)
        return EXIT_BAD_STATE
    log.container = state["id"]
    value = requested(state, spec_root)
    addrs: set[PciAddress]
    if value is None:
        ids, addrs, source = set(settings.get("allowed_ids") or ()), set(), "profile"
        ids = {i.lower().replace("0x", "") for i in ids}
    else:
        source = "annotation"
        try:
            ids, addrs = parse_selection(value)
        except ValueError as e:
            log.write("select", "error", source=source, annotation=value, error=str(e))
            line = (f"annotation {ANNOTATION}={value!r} is malformed: {e}; expected vendor:device IDs (8086:10ca) "
                    "or guest PCI addresses (0000:02:00.0), separated by commas or spaces")
            say(line, err)
            log.write("end", "error", devices=0, error=line, ms=elapsed_ms())
            return EXIT_BAD_REQUEST
    log.write("start", "ok", source=source, annotation=value, ids=sorted(ids), addresses=sorted(addrs),
              argv=list(argv) if argv is not None else None,
              state={k: state.get(k) for k in ("id", "pid", "status", "bundle")})
    if not ids and not addrs:
        log.write("select", "no-devices", source=source)
        log.write("end", "ok", devices=0, ms=elapsed_ms())
        return EXIT_OK

    def read() -> Inventory:
        return pci.read_inventory(host, timeout=max(1.0, budget / 2))

    inv = read()
    explicit = source == "annotation"
    waited = 0.0
    if explicit:   # what was asked for may still be on its way (hot-plug): wait, within half the budget left
        try:
            device_wait = max(0.0, float(settings.get("device_wait", DEFAULT_DEVICE_WAIT)))
        except (TypeError, ValueError):
            device_wait = DEFAULT_DEVICE_WAIT
        now = time.monotonic()
        inv, waited = wait_for_devices(read, inv, ids, addrs, min(now + device_wait, now + (deadline - now) / 2), log)
    chosen, refused = select_devices(inv, ids, addrs)
    failures = []
    asked = f"asked for ({ANNOTATION}={value!r})"
    for a, why in refused:
        d = inv.devices.get(a)
        log.write("select", "refused", device=a, vendor_device=d.vendor_device if d else None,
                  old_driver=d.driver if d else None, group=d.iommu_group if d else None, error=why)
        if explicit and a in addrs:
            if d is None:
                failures.append(f"{a} was {asked} but the guest has no such device (waited {waited:.1f} s); "
                                f"the guest has: {guest_devices(inv)}")
            else:
                failures.append(f"{a} ({d.vendor_device}) was {asked} but is refused: {why}")
    if explicit:
        got = {d.vendor_device for d in chosen}
        for i in sorted(ids - got):
            refused_with = [(a, why) for a, why in refused if a in inv.devices and inv.devices[a].vendor_device == i]
            if refused_with:
                why = "every device with it is refused: " + "; ".join(f"{a}: {w}" for a, w in refused_with)
            else:
                why = "no device of the guest has that vendor:device"
                log.write("select", "refused", device=None, vendor_device=i, error=why)
            failures.append(f"{i} was {asked} but {why} (waited {waited:.1f} s); the guest has: {guest_devices(inv)}")
    for line in failures:
        say(line, err)
    if not chosen:
        log.write("select", "no-devices", source=source)
    done, failed = set(), 0
    for d in chosen:
        if d.iommu_group in done:
            continue
        done.add(d.iommu_group)
        lines = bind_group(host, inv, d, log)
        if lines:
            failed += 1
            for line in lines:
                say(line, err)
            failures += lines
    log.write("end", "ok" if not failures else "error", devices=len(chosen), groups=sorted(done),
              failed_groups=failed, ms=elapsed_ms(),
              **({"error": "; ".join(failures)[:2000]} if failures else {}))
    return EXIT_BIND_FAILED if failures else EXIT_OK


def main(argv: list[str] | None = None, settings_path: str | None = None, stdin: BinaryIO | None = None,
         host: Host | None = None) -> int:
    """Entry point of the installed hook: argv = [name, stage] (the agent passes the basename as
    argv[0]; the stage defaults to prestart)."""
    t_start = time.monotonic()
    argv = list(sys.argv if argv is None else argv)
    stage = argv[1] if len(argv) > 1 and argv[1] else "prestart"
    settings = load_settings(settings_path) if settings_path else {}
    log_path = settings.get("log") or DEFAULT_LOG
    budget = _budget(settings)

    log = HookLog(log_path, stage)

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        log.write("end", "timeout", error=f"hook exceeded {budget:g} s; gave up")
        try:   # os._exit skips the buffers: write(2) directly
            os.write(2, f"vfio-hook: gave up after {budget:g} s (the hook's timeout); see {log_path}\n".encode())
        except OSError:
            pass
        os._exit(EXIT_TIMEOUT)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        raw = (stdin or sys.stdin.buffer).read()
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if host is None:
            from vfiotest.host import LocalHost

            host = LocalHost("guest")
        return run(stage, text, host, settings, log_path, log=log, deadline=t_start + budget, argv=argv)
    except Exception as e:
        log.write("end", "error", error=f"internal error: {type(e).__name__}: {e}")
        say(f"internal error: {type(e).__name__}: {_cause(e)}; see {log_path}")
        return EXIT_INTERNAL
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


if __name__ == "__main__":
    sys.exit(main())
