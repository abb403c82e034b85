"""The guest hook: an OCI prestart hook that binds the container's devices to vfio-pci.

Runs inside the Kata guest with the standard library only (python3 and the
modules shipped next to it in the image: vfiotest.errors, host, pci, bind).
The agent runs it with argv `[path, stage]` and the OCI state JSON on stdin.

Which devices: the annotation `io.katacontainers.x.vfio` (set by the harness
when it starts a container; read from the state, else from the spec the agent
keeps at /run/libcontainer/<id>/config.json): tokens separated by commas or
spaces, each a `vendor:device` ID (`8086:10ca`) or a guest PCI address. An
empty annotation asks for nothing. Without the annotation: the profile's
vendor:device list from the hook's settings. Never a virtio device (vendor
1af4), a bridge, or a device the guest itself needs (the inventory's
protected set: default-route NIC, disks of mounted filesystems), nor a group
that holds one.

Each selected device's whole IOMMU group is bound with the device layer
(`driver_override` + unbind + `drivers_probe`, verified by the driver link and
`/dev/vfio/<group>`). One JSON line per action goes to the log under /tmp:
`{"time", "stage", "container", "action", "device", "vendor_device",
"old_driver", "new_driver", "group", "result", "error", "ms"}`. A device
error is logged and the hook goes on (exit 0); a malformed state is logged and
the hook exits 2 at once; the whole run is bounded (exit 3 on timeout).
"""

import json
import os
import re
import signal
import sys
import time

ANNOTATION = "io.katacontainers.x.vfio"
DEFAULT_LOG = "/tmp/vfio-hook.log"
DEFAULT_TIMEOUT = 20.0
VIRTIO_VENDOR = "0x1af4"
EXIT_OK, EXIT_BAD_STATE, EXIT_TIMEOUT, EXIT_INTERNAL = 0, 2, 3, 4
_ID_RE = re.compile(r"^(?:0x)?([0-9a-fA-F]{4}):(?:0x)?([0-9a-fA-F]{4})$")


class BadState(Exception):
    """The OCI state on stdin is not what the runtime spec describes."""


class HookLog:
    """Appends one JSON object per line; one write(2) per line so lines never interleave."""

    def __init__(self, path, stage, container=None):
        self.path, self.stage, self.container = path, stage, container

    def write(self, action, result, **fields):
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


def parse_state(text):
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


def requested(state, spec_root="/run/libcontainer"):
    """The annotation value (None when the container set none), from the state or the agent's spec copy."""
    ann = state.get("annotations") or {}
    if ANNOTATION in ann:
        return ann[ANNOTATION]
    path = os.path.join(spec_root, state["id"], "config.json")
    try:
        with open(path) as f:
            spec = json.load(f)
        value = (spec.get("annotations") or {}).get(ANNOTATION)
        return value
    except (OSError, ValueError, AttributeError):
        return None


def parse_selection(value):
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


def select_devices(inv, ids, addrs):
    """Devices asked for, and [(address, reason)] of those refused."""
    chosen, refused = [], []
    for a, d in sorted(inv.devices.items()):
        if a in addrs or d.vendor_device in ids:
            if d.vendor == VIRTIO_VENDOR:
                refused.append((a, "virtio device (the agent's own)"))
            elif a in inv.protected:
                refused.append((a, "the guest needs it: " + inv.protected[a]))
            elif d.is_bridge:
                refused.append((a, "a PCI bridge"))
            else:
                chosen.append(d)
    for a in sorted(addrs - set(inv.devices)):
        refused.append((a, "no such device in the guest"))
    return chosen, refused


def bind_group(host, inv, dev, log):
    """Bind the IOMMU group of `dev` to vfio-pci with the device layer; log each device."""
    from vfiotest import bind

    members = [inv.devices[a] for a in inv.group_of(dev.address) if a in inv.devices]
    for m in members:
        if m.vendor == VIRTIO_VENDOR or m.address in inv.protected:
            log.write("bind", "error", device=m.address, vendor_device=m.vendor_device, old_driver=m.driver,
                      new_driver=m.driver, group=dev.iommu_group,
                      error=f"group {dev.iommu_group} also holds {m.address}, which the guest needs; group left alone")
            return False
    ok = True
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
            ok = False
    dev_path = f"/dev/vfio/{dev.iommu_group}"
    deadline = time.monotonic() + 5.0   # udev makes the node shortly after the last bind
    while not (present := host.exists(dev_path)) and time.monotonic() < deadline:
        time.sleep(0.05)
    log.write("verify", "ok" if present else "error", device=dev.address, group=dev.iommu_group, path=dev_path,
              **({} if present else {"error": f"{dev_path} did not appear"}))
    return ok and present


def load_settings(path):
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def run(stage, stdin_text, host, settings, log_path=None, spec_root="/run/libcontainer", log=None):
    """The hook's work for one call; returns the exit code. `host` is the guest
    (LocalHost) or a simulated sysfs in tests."""
    from vfiotest.pci import read_inventory

    log = log or HookLog(log_path or settings.get("log") or DEFAULT_LOG, stage)
    t0 = time.monotonic()
    try:
        state = parse_state(stdin_text)
    except BadState as e:
        log.write("state", "error", error=str(e), stdin=stdin_text[:200])
        return EXIT_BAD_STATE
    log.container = state["id"]
    value = requested(state, spec_root)
    if value is None:
        ids, addrs, source = set(settings.get("allowed_ids") or ()), set(), "profile"
        ids = {i.lower().replace("0x", "") for i in ids}
    else:
        source = "annotation"
        try:
            ids, addrs = parse_selection(value)
        except ValueError as e:
            log.write("select", "error", source=source, annotation=value, error=str(e))
            return EXIT_OK
    log.write("start", "ok", source=source, annotation=value, ids=sorted(ids), addresses=sorted(addrs))
    if not ids and not addrs:
        log.write("select", "no-devices", source=source)
        log.write("end", "ok", devices=0, ms=round((time.monotonic() - t0) * 1000, 1))
        return EXIT_OK
    inv = read_inventory(host, timeout=max(1.0, settings.get("timeout", DEFAULT_TIMEOUT) / 2))
    chosen, refused = select_devices(inv, ids, addrs)
    for a, why in refused:
        d = inv.devices.get(a)
        log.write("select", "refused", device=a, vendor_device=d.vendor_device if d else None,
                  old_driver=d.driver if d else None, group=d.iommu_group if d else None, error=why)
    if not chosen:
        log.write("select", "no-devices", source=source)
    done, failed = set(), 0
    for d in chosen:
        if d.iommu_group in done:
            continue
        done.add(d.iommu_group)
        if not bind_group(host, inv, d, log):
            failed += 1
    log.write("end", "ok" if not failed else "error", devices=len(chosen), groups=sorted(done), failed_groups=failed,
              ms=round((time.monotonic() - t0) * 1000, 1))
    return EXIT_OK


def main(argv=None, settings_path=None, stdin=None, host=None):
    """Entry point of the installed hook (argv = [path, stage])."""
    argv = list(sys.argv if argv is None else argv)
    stage = argv[1] if len(argv) > 1 else "prestart"
    settings = load_settings(settings_path) if settings_path else {}
    log_path = settings.get("log") or DEFAULT_LOG
    budget = float(settings.get("timeout") or DEFAULT_TIMEOUT)

    log = HookLog(log_path, stage)

    def on_alarm(signum, frame):
        log.write("end", "timeout", error=f"hook exceeded {budget:.0f} s; gave up")
        os._exit(EXIT_TIMEOUT)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        raw = (stdin or sys.stdin.buffer).read()
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if host is None:
            from vfiotest.host import LocalHost

            host = LocalHost("guest")
        return run(stage, text, host, settings, log_path, log=log)
    except Exception as e:
        log.write("end", "error", error=f"internal error: {type(e).__name__}: {e}")
        return EXIT_INTERNAL
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


if __name__ == "__main__":
    sys.exit(main())
