"""The Kata agent's stand-in in the nested test guest (standard library only).

Where Kata cannot run (the emulated runner), the guest image built by
`vfiotest.kata.initrd` boots in a second-level QEMU VM and this script runs
from a dracut pre-mount hook, in the agent's place. It runs the OCI hooks from
`<guest_hook_path>/prestart` exactly as the agent does: the directory scanned
once, regular executable files only (no symlinks), in lexical order, each with
argv `[path, "prestart"]` and the OCI state JSON on stdin, with the annotation
`io.katacontainers.x.vfio`; the spec is also written to
`/run/libcontainer/<id>/config.json`, where the agent keeps it.

The kernel command line drives it:
  vfiotest.vfio=<annotation value>      what the container asks for (commas, no spaces)
  vfiotest.runs=main,again,none,malformed   which hook runs to do, in order
  vfiotest.hookpath=/usr/share/oci/hooks

At the end it prints a report to the console (base64 JSON between markers,
read by `vfiotest.kata.nested.parse_report`): each run's exit code and time,
the hook log from /tmp, /dev/vfio, and the PCI state before and after.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from typing import Any, TextIO

if not __package__:  # run as a script in the guest: <lib>/vfiotest/kata/standin_agent.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from vfiotest.constants import VFIO_ANNOTATION as ANNOTATION

REPORT_BEGIN = "VFIOTEST-REPORT-BEGIN"
REPORT_END = "VFIOTEST-REPORT-END"
REPORT_LINE = "VFIOTEST-REPORT "
DEFAULT_HOOK_PATH = "/usr/share/oci/hooks"
HOOK_LOG = "/tmp/vfio-hook.log"
HOOK_TIMEOUT = 60.0


def cmdline_args(text: str) -> dict[str, str]:
    out = {}
    for word in text.split():
        if word.startswith("vfiotest.") and "=" in word:
            k, v = word.split("=", 1)
            out[k[len("vfiotest."):]] = v
    return out


def scan_hooks(hook_path: str, stage: str) -> list[str]:
    """The hooks the agent would run for `stage`: regular executable files, sorted."""
    d = os.path.join(hook_path, stage)
    found: list[str] = []
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return found
    for n in names:
        p = os.path.join(d, n)
        st = os.lstat(p)
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            found.append(p)
    return found


def state_for(container_id: str, annotation: str | None) -> dict[str, Any]:
    """The OCI state the agent hands to hooks; `annotation` None leaves it out."""
    ann = {} if annotation is None else {ANNOTATION: annotation}
    return {"ociVersion": "1.0.2", "id": container_id, "status": "created", "pid": os.getpid(),
            "bundle": f"/run/kata-containers/shared/containers/{container_id}", "annotations": ann}


def run_hook(path: str, stage: str, stdin_bytes: bytes, timeout: float = HOOK_TIMEOUT) -> dict[str, Any]:
    t0 = time.monotonic()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    try:
        # argv[0] is the basename, as the Kata 1.x agent passes it
        p = subprocess.run([os.path.basename(path), stage], executable=path, input=stdin_bytes, capture_output=True,
                           timeout=timeout, env=env, cwd="/")
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = None, e.stdout or b"", (e.stderr or b"") + b"\n(timed out)"
    return {"hook": path, "argv": [os.path.basename(path), stage], "rc": rc, "seconds": round(time.monotonic() - t0, 3),
            "stdout": out.decode(errors="replace")[-2000:], "stderr": err.decode(errors="replace")[-2000:]}


def pci_state() -> dict[str, dict[str, str | None]]:
    """Driver, IDs and IOMMU group of every PCI device of this guest."""
    base = "/sys/bus/pci/devices"
    out: dict[str, dict[str, str | None]] = {}
    for a in sorted(os.listdir(base)):
        d = os.path.join(base, a)

        def rd(name: str, d: str = d) -> str | None:
            try:
                with open(os.path.join(d, name)) as f:
                    return f.read().strip()
            except OSError:
                return None

        def ln(name: str, d: str = d) -> str | None:
            try:
                return os.path.basename(os.readlink(os.path.join(d, name)))
            except OSError:
                return None
        out[a] = {"vendor": rd("vendor"), "device": rd("device"), "class": rd("class"), "driver": ln("driver"),
                  "driver_override": rd("driver_override"), "iommu_group": ln("iommu_group")}
    return out


def dev_vfio() -> dict[str, str]:
    out = {}
    try:
        for n in sorted(os.listdir("/dev/vfio")):
            st = os.stat("/dev/vfio/" + n)
            out[n] = "char" if stat.S_ISCHR(st.st_mode) else "other"
    except OSError:
        pass
    return out


def read_text(path: str, limit: int = 200000) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read()[-limit:].decode(errors="replace")
    except OSError:
        return None


def emit_report(report: dict[str, Any], out: TextIO = sys.stdout) -> None:
    blob = json.dumps(report, sort_keys=True).encode()
    enc = base64.b64encode(blob).decode()
    out.write(f"\n{REPORT_BEGIN} {len(blob)} {hashlib.sha256(blob).hexdigest()}\n")
    for i in range(0, len(enc), 76):
        out.write(f"{REPORT_LINE}{i // 76:05d} {enc[i:i + 76]}\n")
    out.write(f"{REPORT_END}\n")
    out.flush()


def main() -> int:
    t_start = time.monotonic()
    args = cmdline_args(read_text("/proc/cmdline") or "")
    hook_path = args.get("hookpath", DEFAULT_HOOK_PATH)
    annotation = args.get("vfio")
    runs = [r for r in args.get("runs", "main").split(",") if r]
    report: dict[str, Any] = {"uptime_at_start": float((read_text("/proc/uptime") or "0").split()[0]),
              "cmdline": read_text("/proc/cmdline"), "hook_path": hook_path, "annotation": annotation,
              "pci_before": pci_state(), "vfio_before": dev_vfio(), "runs": []}
    hooks = scan_hooks(hook_path, "prestart")  # scanned once, like the agent at sandbox creation
    report["hooks"] = hooks
    for i, kind in enumerate(runs):
        cid = f"vfiotest-{kind}-{i}"
        if kind == "malformed":
            stdin = b'{"ociVersion": "1.0.2", "id": '   # cut short: not JSON
        else:
            state = state_for(cid, "" if kind == "none" else annotation)
            spec_dir = f"/run/libcontainer/{cid}"
            os.makedirs(spec_dir, exist_ok=True)
            with open(spec_dir + "/config.json", "w") as f:
                json.dump({"ociVersion": "1.0.2", "annotations": state["annotations"]}, f)
            stdin = json.dumps(state).encode()
        results = [run_hook(h, "prestart", stdin) for h in hooks]
        report["runs"].append({"kind": kind, "container": cid, "results": results,
                               "vfio_after": dev_vfio()})
        print(f"vfiotest: run {kind}: " + ", ".join(f"{os.path.basename(r['hook'])} rc={r['rc']} {r['seconds']}s"
                                                    for r in results), flush=True)
    report["pci_after"] = pci_state()
    report["vfio_after"] = dev_vfio()
    report["hook_log"] = read_text(HOOK_LOG)
    report["uptime_at_end"] = float((read_text("/proc/uptime") or "0").split()[0])
    report["standin_seconds"] = round(time.monotonic() - t_start, 3)
    emit_report(report)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # the console is the only way out of this guest: say what broke
        emit_report({"error": f"{type(e).__name__}: {e}"})
        sys.exit(1)
