"""The reliability campaign (`ci/campaign`): against the emulated runner, one row per property,
printed as each finishes, with its target; exit status 1 when a row misses it.

Rows:
  unkilled          the subject (ci/campaign_subject.py: every layer, up to a Kata container
                    holding a VF) passes and leaves the runner as found
  kill -9 <phase>   the harness killed (whole process group, SIGKILL) a seeded delay into each
                    phase; then `vfiotest restore`: devices, VF counts, /dev/vfio, podman and Kata
                    files, containers, Kata VMs, podman services, journals and leases as before
  bad input <what>  every bad input of the CLI and the plugin: its exit status, the message
                    naming the thing and the next step, and the runner unchanged
  two sessions      two `pytest suites/rebind -n 2` 2 s apart: both pass, nothing skipped, no
                    group or PF held by both at once
  rebind xN         the rebind suite N times in a row: each passes, no drift in host state
  runner killed     the runner's QEMU killed while a Kata container runs: the harness says so
                    within its timeout; `vfiotest runner up` and the next run pass
  ssh cut           every packet to the runner's sshd dropped while a Kata container runs: the
                    harness says so within its timeout; after the link is back, `vfiotest
                    restore` and the next run leave the runner as found

`--quick` (what CI runs) kills once per phase (every bad input still: they are cheap) and
leaves out the rebind xN row: CI runs the rebind suite four times elsewhere (the main job, the
two sessions here), each ended by the host state guard; `--rebind-runs N` puts it back. The
long mode kills 8 times per phase (56) and runs the rebind suite 100 times. `--seed` makes the
kill delays reproducible. When the unkilled or kill rows run, the runner boots without the
read-only image store (VFIOTEST_RUNNER_IMAGE_STORE=0), so that the image import phase is a real
`podman import`. The integration tests leave to this campaign the proofs it makes
(kill -9 at any moment then restore; two sessions, and workers, never holding one group).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, Callable, Optional

from vfiotest import constants
from vfiotest.host import wait_for
from vfiotest.runner import bootcfg

SUBJECT = "ci/campaign_subject.py"
MARK = "campaign phase: "
PHASES = ("VF creation", "bind", "group bind", "runtime registration", "image import", "container start",
          "Kata VM running")
PY = sys.executable


# -- the table ----------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    target: str
    measured: str
    ok: bool
    seconds: float


class Table:
    def __init__(self, out: Any = sys.stdout) -> None:
        self.rows: list[Row] = []
        self.out = out
        print(f"{'row':<44} {'target':<46} {'measured':<44} {'s':>6}  ok", file=out, flush=True)

    def add(self, name: str, target: str, measured: str, ok: bool, seconds: float) -> Row:
        row = Row(name, target, measured, ok, seconds)
        self.rows.append(row)
        print(f"{name:<44} {target:<46} {measured:<44} {seconds:>6.0f}  {'yes' if ok else 'NO'}",
              file=self.out, flush=True)
        return row

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)


def note(text: str) -> None:
    print(f"  [campaign] {text}", file=sys.stderr, flush=True)


# -- the target and its state --------------------------------------------------------------------
class Campaign:
    def __init__(self, root: str, state_dir: str, seed: int, quick: bool) -> None:
        self.root, self.state_dir, self.quick = root, state_dir, quick
        self.rng = random.Random(seed)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VFIOTEST_"))}
        self.env.update(VFIOTEST_TARGET="virtual", VFIOTEST_STATE_DIR=state_dir)
        for k in ("VFIOTEST_CACHE_DIR",):
            if os.environ.get(k):
                self.env[k] = os.environ[k]
        os.environ["VFIOTEST_STATE_DIR"] = state_dir   # this process reaches the same runner
        self._host: Any = None

    # commands
    def vfiotest(self, *args: str, timeout: float = 600, env: Optional[dict] = None) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "vfiotest", *args], cwd=self.root, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)

    def pytest(self, *args: str, timeout: float = 1800, env: Optional[dict] = None) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=self.root,
                              env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout)

    def host(self) -> Any:
        from vfiotest.runner import Runner

        if self._host is None:
            self._host = Runner.default().host()
            self._host.connect()
        return self._host

    def drop_host(self) -> None:
        if self._host is not None:
            try:
                self._host.close()
            except Exception:  # noqa: BLE001 - a dead link is why we drop it
                pass
            self._host = None

    def snapshot(self) -> dict[str, Any]:
        """What the harness may change on the runner, and what must be gone after it."""
        from vfiotest.journal import JOURNAL_ROOT
        from vfiotest.lease import LEASE_ROOT
        from vfiotest.pci import read_inventory

        host = self.host()
        inv = read_inventory(host).state()
        script = (
            "echo containers $(podman ps -a -q 2>/dev/null | wc -l); "
            "for p in '[q]emu-system' '[p]odman --runtime' '[c]onmon' '[k]ata-shim' '[k]ata-proxy'; do "
            "  echo proc \"$p\" $(pgrep -fc \"$p\"); done; "
            f"find /etc/containers {constants.KATA_STATE_DIR} -maxdepth 2 -type f -size -1024k "
            "-exec sha256sum {} + 2>/dev/null | sort -k2; "
            # every journal, and every lock file but the CLI's (kept on purpose, journal.Journal.close)
            f"ls {JOURNAL_ROOT} 2>/dev/null | grep -vx cli.lock | sed 's/^/journal /'; "
            f"ls {LEASE_ROOT} 2>/dev/null | grep json | sed 's/^/lease /'; "
            f"ls {constants.PODMAN_SOCKET_DIR} 2>/dev/null | sed 's/^/socket /'; true")
        res = host.run(script, timeout=120, check=True, what="reading the runner's state")
        sessions = os.path.join(self.state_dir, "sessions")
        return {"pci": inv["devices"], "vfio": sorted(inv["vfio"]), "other": res.stdout.splitlines(),
                "controller sessions": sorted(os.listdir(sessions)) if os.path.isdir(sessions) else []}

    def snapshot_when_back(self, wait: float) -> dict[str, Any]:
        """snapshot(), retried every 10 s for up to `wait` s while the runner does not answer on SSH."""
        deadline = time.monotonic() + wait
        while True:
            try:
                return self.snapshot()
            except Exception as e:  # noqa: BLE001 - paramiko's own errors too
                self.drop_host()
                if time.monotonic() > deadline:
                    raise
                note(f"the runner does not answer on SSH yet ({str(e).splitlines()[0][:120]}); again in 10 s")
                time.sleep(10)

    def runner_load(self) -> str:
        """The runner's load, memory and busiest processes (for a row's note); never raises."""
        try:
            res = self.host().run("cat /proc/loadavg; free -m | head -2; "
                                  "ps -eo pid,pcpu,rss,etime,args --sort=-pcpu | head -8 | cut -c1-150",
                                  timeout=60, what="reading the runner's load")
            return res.stdout.strip()
        except Exception as e:  # noqa: BLE001 - a diagnostic only
            self.drop_host()
            return f"(not read: {str(e).splitlines()[0][:120]})"

    def controller_view(self) -> str:
        """The runner's supervisor log, console size and QEMU processes on this machine (for a note)."""
        from vfiotest.runner import Runner

        r = Runner.default()
        out = []
        try:
            with open(r.supervisor_log, errors="replace") as f:
                out.append("supervisor.log: " + "".join(f.readlines()[-6:]))
        except OSError as e:
            out.append(f"supervisor.log: {e}")
        try:
            out.append(f"console.log: {os.path.getsize(r.console_log)} bytes")
        except OSError as e:
            out.append(f"console.log: {e}")
        ps = subprocess.run(["ps", "-eo", "pid,stat,etime,rss,args"], capture_output=True, text=True)
        out += [ln[:200] for ln in ps.stdout.splitlines() if "qemu-system" in ln or "runner.supervisor" in ln]
        return "\n".join(out)

    @staticmethod
    def diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
        out = []
        for addr in sorted(set(a["pci"]) | set(b["pci"])):
            if a["pci"].get(addr) != b["pci"].get(addr):
                out.append(f"{addr}: {a['pci'].get(addr)} -> {b['pci'].get(addr)}")
        if a["vfio"] != b["vfio"]:
            out.append(f"/dev/vfio: {a['vfio']} -> {b['vfio']}")
        for line in sorted(set(a["other"]) ^ set(b["other"])):
            out.append(("gone: " if line in a["other"] else "new: ") + line)
        if a["controller sessions"] != b["controller sessions"]:
            out.append(f"controller sessions: {a['controller sessions']} -> {b['controller sessions']}")
        return out

    # the subject, killed or not
    def run_subject(self, kill_phase: Optional[str] = None, delay: float = 0.0,
                    at_phase: Optional[Callable[[], None]] = None, timeout: float = 1200) -> dict[str, Any]:
        """Run the subject; with `kill_phase`, SIGKILL its process group `delay` s after that phase
        line; with `at_phase` (and kill_phase naming the phase), call it then instead of killing."""
        t0 = time.monotonic()
        # -s: the phase lines (on stderr) as they come, not captured until the test ends
        p = subprocess.Popen([PY, "-m", "pytest", SUBJECT, "-p", "no:cacheprovider", "-q", "-x", "-s"], cwd=self.root,
                             env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
        lines: list[str] = []
        times: dict[str, float] = {}
        acted: dict[str, float] = {}

        def act() -> None:
            time.sleep(delay)
            acted["at"] = time.monotonic() - t0
            try:
                if at_phase is not None:
                    at_phase()
                else:
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            finally:
                acted["done"] = 1

        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line)
            i = line.find(MARK)
            if i >= 0:
                name = line[i + len(MARK):].strip()
                # a phase's line comes again in pytest's failure report ("Captured log"): only
                # its first one counts, and the action is taken once (a second runner kill or
                # link cut at the run's end once hit the next row's runner)
                if name not in times:
                    times[name] = time.monotonic() - t0
                    if name == kill_phase:
                        threading.Thread(target=act, daemon=True).start()
            if time.monotonic() - t0 > timeout:
                os.killpg(p.pid, signal.SIGKILL)
        rc = p.wait()
        if kill_phase and kill_phase in times and "done" not in acted:
            # the run ended within `delay` of the phase: let the action happen now, not later
            # in the caller's next step
            wait_for(lambda: "done" in acted, delay + 60, 0.1, "the campaign's action", fail=False)
        return {"rc": rc, "lines": lines, "times": times, "acted": acted.get("at"), "end": time.monotonic() - t0}

    def restore(self) -> subprocess.CompletedProcess:
        return self.vfiotest("restore", "--target", "virtual", timeout=900)

    def remove_images(self) -> None:
        self.host().run("podman images --format '{{.Repository}}:{{.Tag}}' | grep vfiotest | "
                        "xargs -r podman rmi -f", timeout=300)


# -- rows ----------------------------------------------------------------------------------------
def row_unkilled(c: Campaign, table: Table, s0: dict) -> Optional[dict[str, float]]:
    t = time.monotonic()
    c.remove_images()            # so that the image import phase is a real import
    r = c.run_subject()
    after = c.snapshot()
    d = c.diff(s0, after)
    ok = r["rc"] == 0 and not d and all(ph in r["times"] for ph in PHASES)
    table.add("unkilled subject", "passes, every phase, left as found",
              f"rc {r['rc']}, {len(r['times'])} phases, {len(d)} diffs", ok, time.monotonic() - t)
    if not ok:
        note("".join(r["lines"][-40:]))
        for line in d:
            note(line)
        return None
    marks = [r["times"][ph] for ph in PHASES] + [r["times"].get("done", r["end"])]
    return {ph: max(marks[i + 1] - marks[i], 0.5) for i, ph in enumerate(PHASES)}


def rows_kills(c: Campaign, table: Table, s0: dict, durations: dict[str, float], per_phase: int) -> None:
    for ph in PHASES:
        t = time.monotonic()
        good, problems, delays = 0, [], []
        for i in range(per_phase):
            # stratified over the phase: the i-th kill lands in the i-th slice of its duration
            delay = (i + c.rng.random()) / per_phase * durations[ph]
            delays.append(delay)
            if ph == "image import":
                c.remove_images()
            r = c.run_subject(kill_phase=ph, delay=delay)
            rs = c.restore()
            after = c.snapshot()
            d = c.diff(s0, after)
            killed = r["acted"] is not None
            if killed and rs.returncode == 0 and not d:
                good += 1
            else:
                problems.append(f"delay {delay:.1f}s: killed={killed} restore rc {rs.returncode}: "
                                f"{rs.stderr.strip()[-300:]} {d[:6]}")
                if d:      # put it back for the next kill
                    c.restore()
        table.add(f"kill -9 during {ph} (x{per_phase})", "restore: all left exactly as before",
                  f"{good}/{per_phase} as before (delays {min(delays):.1f}-{max(delays):.1f}s)",
                  good == per_phase, time.monotonic() - t)
        for p in problems:
            note(p)


def bad_inputs(c: Campaign, s0: dict) -> list[tuple[str, list[str], dict, int, str, str]]:
    """(name, argv, env, expected exit, text the message must have, 'cli'|'pytest')."""
    from vfiotest.pci import read_inventory
    from vfiotest.profiles import get_profile

    inv = read_inventory(c.host())
    profile = get_profile("emulated")
    protected = next(iter(inv.protected), None)
    outside = next((d.address for d in inv.devices.values() if not profile.allows(d.vendor_device)
                    and not d.is_bridge and d.address not in inv.protected and d.iommu_group), None)
    t = ["--target", "virtual"]
    rows = [
        ("bind: malformed address", ["bind", *t, "0000:zz:00.0"], {}, 2, "not a PCI address", "cli"),
        ("bind: no such device", ["bind", *t, "0000:7f:1f.7"], {}, 4, "no PCI device", "cli"),
        ("unbind: malformed address", ["unbind", *t, "01:10"], {}, 2, "not a PCI address", "cli"),
        ("bind: unknown target", ["bind", "--target", "bogus", "0000:01:10.0"], {}, 2, "bogus", "cli"),
        ("bind: unreachable ssh target", ["bind", "--target", "ssh://root@127.0.0.1:1", "0000:01:10.0"], {}, 5,
         "127.0.0.1", "cli"),
        ("bind: unknown profile", ["bind", *t, "--profile", "nosuch", "0000:01:10.0"], {}, 2, "nosuch", "cli"),
        ("probe: runtime not registered", ["probe", *t, "--runtime", "nosuch-runtime", "--group", "1"], {}, 9,
         "nosuch-runtime", "cli"),
        ("pytest: --numvfs abc", ["suites/rebind", "--numvfs", "abc", "--collect-only"], {}, 4, "abc", "pytest"),
        ("pytest: VFIOTEST_NUMVFS=abc", ["suites/rebind", "--collect-only"], {"VFIOTEST_NUMVFS": "abc"}, 4, "abc",
         "pytest"),
        ("pytest: --target bogus", ["suites/rebind", "--target", "bogus", "--collect-only"], {}, 4, "bogus", "pytest"),
        ("pytest: --pf malformed", ["suites/rebind", "--pf", "zz:00", "--collect-only"], {}, 4, "zz:00", "pytest"),
    ]
    if protected:
        rows.append(("bind: device the host needs", ["bind", *t, protected], {}, 3, protected, "cli"))
    if outside:
        rows.append(("bind: device outside the allowlist", ["bind", *t, outside], {}, 3, "allowlist", "cli"))
    return rows


def rows_bad_inputs(c: Campaign, table: Table, s0: dict) -> None:
    from vfiotest.journal import JOURNAL_ROOT

    for name, argv, env, want, text, kind in bad_inputs(c, s0):
        t = time.monotonic()
        before = c.snapshot()
        p = c.vfiotest(*argv, env=env, timeout=300) if kind == "cli" else c.pytest(*argv, env=env, timeout=300)
        out = p.stdout + p.stderr
        d = c.diff(before, c.snapshot())
        clear = text in out and ("next step" in out or kind == "pytest")
        ok = p.returncode == want and clear and not d
        table.add(f"bad input: {name}", f"exit {want}, names it{', next step' if kind == 'cli' else ''}, unchanged",
                  f"exit {p.returncode}, {'clear' if clear else 'UNCLEAR'}, {len(d)} diffs", ok, time.monotonic() - t)
        if not ok:
            note(out.strip()[-600:])
    # a PF with VFs enabled, and a corrupt journal: set up by the campaign, put back after
    from vfiotest.journal import Journal
    from vfiotest.pci import read_inventory
    from vfiotest.sriov import set_numvfs

    host = c.host()
    pf = next(d for d in read_inventory(host).devices.values() if d.is_pf and d.vendor_device == "8086:10c9")
    with Journal.open(host, owner="campaign") as j:
        set_numvfs(host, pf.address, 2, journal=j)
        t = time.monotonic()
        before = c.snapshot()
        p = c.vfiotest("bind", "--target", "virtual", pf.address)
        d = c.diff(before, c.snapshot())
        ok = p.returncode == 3 and "VFs enabled" in p.stderr and "next step" in p.stderr and not d
        table.add("bad input: bind a PF with VFs enabled", "exit 3, names it, next step, VFs kept",
                  f"exit {p.returncode}, {len(d)} diffs", ok, time.monotonic() - t)
        if not ok:
            note(p.stderr.strip()[-600:])
        # one of its VFs, leased as a running test holds it: the CLI leaves it alone
        from vfiotest.lease import LeasePool

        vf = read_inventory(host).vfs_of(pf.address)[0]
        lease = LeasePool(host).acquire(str(vf.iommu_group), test_id="campaign: a test holding this VF",
                                    devices=[vf.address])
        try:
            t = time.monotonic()
            before = c.snapshot()
            p = c.vfiotest("bind", "--target", "virtual", str(vf.address))
            d = c.diff(before, c.snapshot())
            ok = p.returncode == 7 and "is leased by" in p.stderr and "next step" in p.stderr and not d
            table.add("bad input: bind a VF a test holds", "exit 7, names the holder, next step, unchanged",
                      f"exit {p.returncode}, {len(d)} diffs", ok, time.monotonic() - t)
            if not ok:
                note(p.stderr.strip()[-600:] + " " + " ".join(d[:6]))
        finally:
            lease.release()
        j.restore_all()
    path = f"{JOURNAL_ROOT}/campaign-corrupt.json"
    host.write_atomic(path, "{not json", mode=0o600)
    try:
        t = time.monotonic()
        before = c.snapshot()
        p = c.vfiotest("restore", "--target", "virtual")
        d = [x for x in c.diff(before, c.snapshot()) if "campaign-corrupt" not in x]
        ok = p.returncode == 6 and "corrupt" in p.stderr and "next step" in p.stderr and not d
        table.add("bad input: corrupt journal, then restore", "exit 6, names the file, next step, unchanged",
                  f"exit {p.returncode}, {len(d)} diffs", ok, time.monotonic() - t)
    finally:
        host.remove(path)
        host.remove(f"{JOURNAL_ROOT}/campaign-corrupt.lock")
    d = c.diff(s0, c.snapshot())
    table.add("bad inputs: runner after all of them", "as before", f"{len(d)} diffs", not d, 0)
    for line in d:
        note(line)


def row_two_sessions(c: Campaign, table: Table, s0: dict) -> None:
    t = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="campaign-sessions-")
    procs, logs = [], []
    for name in ("a", "b"):
        log = os.path.join(tmp, f"leases-{name}.jsonl")
        logs.append(log)
        procs.append(subprocess.Popen(
            [PY, "-m", "pytest", "suites/rebind", "-n", "2", "-p", "no:cacheprovider", "-q",
             "--junitxml", os.path.join(tmp, f"junit-{name}.xml")],
            cwd=c.root, env={**c.env, "VFIOTEST_LEASE_LOG": log}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
        time.sleep(2)
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    problems = []
    for name, p, out in zip("ab", procs, outs, strict=True):
        counts = {}
        try:
            suite = ET.parse(os.path.join(tmp, f"junit-{name}.xml")).getroot().find("testsuite")
            counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} if suite is not None else {}
        except (OSError, ET.ParseError):
            pass
        if p.returncode != 0 or not counts or counts["failures"] or counts["errors"] or counts["skipped"]:
            problems.append(f"session {name}: rc {p.returncode} {counts}: {out[-1500:]}")
    leases = []
    for log in logs:
        if os.path.exists(log):
            leases += [json.loads(line) for line in open(log)]
    by: dict[str, list] = {}
    for rec in leases:
        by.setdefault(rec["group"], []).append(rec)
    shared = 0
    for group, held in by.items():
        held.sort(key=lambda rec: rec["start"])
        for x, y in itertools.pairwise(held):
            if y["start"] < x["end"]:
                shared += 1
                problems.append(f"{group} held by {x['test']} and {y['test']} at once")
    d = c.diff(s0, c.snapshot())
    ok = not problems and not d
    table.add("two sessions at once (rebind -n 2, 2 s apart)", "both pass, none skipped, nothing held twice",
              f"{2 - sum(1 for p in problems if p.startswith('session'))}/2 pass, {shared} shared, {len(d)} diffs",
              ok, time.monotonic() - t)
    for line in problems + d:
        note(line)
    if ok:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        note(f"the sessions' lease logs and JUnit files are kept in {tmp}")


def row_rebind_n(c: Campaign, table: Table, s0: dict, n: int) -> None:
    t = time.monotonic()
    passed, drift = 0, []
    for i in range(n):
        p = c.pytest("suites/rebind", "-q")
        if p.returncode == 0:
            passed += 1
        else:
            note(f"rebind run {i + 1}: rc {p.returncode}: {p.stdout[-1500:]}")
        d = c.diff(s0, c.snapshot())
        if d:
            drift.append((i + 1, d))
            note(f"rebind run {i + 1} drift: {d[:8]}")
        note(f"rebind run {i + 1}/{n}: rc {p.returncode}, {len(d)} diffs; so far {passed} passed, "
             f"{len(drift)} drifted, {time.monotonic() - t:.0f} s")
    table.add(f"rebind suite x{n}", "every run passes, no drift", f"{passed}/{n} pass, {len(drift)} drifted",
              passed == n and not drift, time.monotonic() - t)


def row_runner_killed(c: Campaign, table: Table, s_before: dict) -> Optional[dict]:
    """Kill the runner's QEMU mid-run; the next run must undo what the killed one kept and leave all as found.

    The killed run cannot reach its target to undo, so it keeps its undo records (a crashed session on
    the controller); "as found" for the controller is therefore the state before the kill, not after.
    """
    from vfiotest.runner import Runner

    t = time.monotonic()

    def kill_runner() -> None:
        for pid in Runner.default().qemu_pids():
            os.kill(pid, signal.SIGKILL)

    r = c.run_subject(kill_phase="Kata VM running", delay=2, at_phase=kill_runner, timeout=900)
    c.drop_host()
    reported = r["acted"] is not None and r["rc"] not in (0, None)
    took = r["end"] - (r["acted"] or 0)
    text = "".join(r["lines"][-60:])
    said = bool(re.search(r"unreachable|cannot reach|did not finish|closed|EOF|Socket is closed|not up", text))
    table.add("runner VM killed mid-run: reported", "run fails within 180 s, says the target is gone",
              f"rc {r['rc']} after {took:.0f} s, {'said so' if said else 'SILENT'}",
              reported and took <= 180 and said, time.monotonic() - t)
    if not said:
        note(text[-1500:])
    t = time.monotonic()
    up = c.vfiotest("runner", "up", timeout=900)
    if up.returncode != 0 or not Runner.default().is_up():
        note(f"`vfiotest runner up` after the kill: rc {up.returncode}, up: {Runner.default().is_up()}: "
             f"{(up.stdout + up.stderr)[-1500:]}")
        note(c.controller_view())
        table.add("runner VM killed mid-run: next run", "runner up, the next run passes, left as found",
                  f"up rc {up.returncode}", False, time.monotonic() - t)
        return None
    s0 = c.snapshot()
    kept = [n for n in s0["controller sessions"] if n not in s_before["controller sessions"]]
    s0["controller sessions"] = s_before["controller sessions"]
    r = c.run_subject()
    d = c.diff(s0, c.snapshot())
    table.add("runner VM killed mid-run: next run", "runner up, the next run passes, left as found",
              f"up rc {up.returncode}, run rc {r['rc']}, {len(kept)} kept record(s) undone, {len(d)} diffs",
              up.returncode == 0 and r["rc"] == 0 and not d,
              time.monotonic() - t)
    if r["rc"] != 0 or d:
        note("".join(r["lines"][-40:]) + "\n".join(d))
    return s0


# seconds every packet to the runner's sshd is dropped: longer than the harness takes to call the link
# dead (sshhost.LinkWatch: a keepalive every 15 s, dead after 60 s without an answer)
CUT = 100


def row_ssh_cut(c: Campaign, table: Table, s0: dict) -> None:
    from vfiotest.errors import HarnessError

    t = time.monotonic()
    rule = "INPUT -p tcp --dport 22 -j DROP"

    def cut() -> None:
        try:
            c.host().run(f"setsid nohup sh -c 'iptables -I {rule}; sleep {CUT}; iptables -D {rule}' "
                         ">/dev/null 2>&1 < /dev/null &", timeout=10)
        except HarnessError:
            pass
        c.drop_host()

    r = c.run_subject(kill_phase="Kata VM running", delay=2, at_phase=cut, timeout=900)
    took = r["end"] - (r["acted"] or 0)
    text = "".join(r["lines"][-60:])
    words = re.compile(r"did not finish in|timed out|Timeout opening channel|unreachable|cannot reach|lost the connection")
    said = bool(words.search(text))
    first = next((line.strip() for line in r["lines"] if words.search(line)), None)
    if first:
        note(f"the harness first said: {first[:240]}")
    table.add("ssh link cut mid-command: reported", "run fails within 180 s, names what it waited for",
              f"rc {r['rc']} after {took:.0f} s, {'said so' if said else 'SILENT'}",
              r["rc"] != 0 and took <= 180 and said, time.monotonic() - t)
    if not said or r["rc"] == 0:
        note(text[-1500:])
    t = time.monotonic()
    time.sleep(max(0.0, (r["acted"] or 0) + CUT + 10 - r["end"]))     # the link is back
    # waited for all the same: a runner that does not take logins again fails this row, not the campaign
    try:
        c.snapshot_when_back(300)
        back = time.monotonic() - t
        rs = c.restore()
        d1 = c.diff(s0, c.snapshot_when_back(300))
        r = c.run_subject()
        d2 = c.diff(s0, c.snapshot_when_back(300))
    except Exception as e:  # noqa: BLE001 - the row fails, the table still prints
        table.add("ssh link cut mid-command: recovered", "SSH back, restore leaves it as before, next run passes",
                  f"SSH not back: {str(e).splitlines()[0][:60]}", False, time.monotonic() - t)
        return
    ok = rs.returncode == 0 and not d1 and r["rc"] == 0 and not d2
    table.add("ssh link cut mid-command: recovered", "SSH back, restore leaves it as before, next run passes",
              f"SSH {back:.0f} s, restore rc {rs.returncode} ({len(d1)} diffs), run rc {r['rc']} ({len(d2)})", ok,
              time.monotonic() - t)
    if not ok:
        note(rs.stderr[-800:] + "\n".join(d1 + d2) + "".join(r["lines"][-30:]))
        note("the runner now: " + c.runner_load())


# -- main ----------------------------------------------------------------------------------------
ROWS = ("unkilled", "kills", "bad-inputs", "two-sessions", "rebind", "runner-killed", "ssh-cut")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="ci/campaign", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="one kill per phase, no rebind xN row (about 25 min here: 30 rows)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the kill delays (default 1)")
    ap.add_argument("--kills-per-phase", type=int, help="kills per phase (default 1 quick, 8 long: 56)")
    ap.add_argument("--rebind-runs", type=int, help="rebind suite runs in a row (default: none quick, 100 long)")
    ap.add_argument("--only", action="append", choices=ROWS, help="run only these rows (repeatable)")
    ap.add_argument("--state-dir", help="the campaign's own state directory (its own runner); default: a new temporary one")
    args = ap.parse_args(argv)
    per_phase = args.kills_per_phase or (1 if args.quick else 8)
    runs = args.rebind_runs or (0 if args.quick else 100)
    if per_phase < 1 or (args.rebind_runs is not None and args.rebind_runs < 1):
        ap.error("--kills-per-phase and --rebind-runs must be at least 1")
    root = os.getcwd()
    if not os.path.exists(os.path.join(root, SUBJECT)):
        ap.error(f"run it from the repository's top directory ({SUBJECT} not found in {root})")
    only = set(args.only or ROWS)
    if runs == 0 and not args.only:
        only.discard("rebind")
    state = args.state_dir or tempfile.mkdtemp(prefix="vfiotest-campaign-")
    c = Campaign(root, state, args.seed, args.quick)
    if "unkilled" in only or "kills" in only:
        # the image import phase must be a real `podman import`, killed and undone: a runner
        # booted with the test image in its read-only store would have nothing to import
        c.env[bootcfg.IMAGE_STORE_ENV] = "0"
    if "rebind" in only and runs == 0:
        runs = 2
    print(f"campaign: seed {args.seed}, {per_phase} kill(s) per phase, "
          f"{f'rebind x{runs}' if 'rebind' in only else 'no rebind xN row'}, state {state}", flush=True)
    table = Table()
    t0 = time.monotonic()
    up = c.vfiotest("runner", "up", timeout=900)
    if up.returncode != 0:
        print(f"campaign: the emulated runner did not come up: {up.stderr[-2000:]}", file=sys.stderr)
        return 2
    try:
        s0 = c.snapshot()
        durations = None
        if "unkilled" in only or "kills" in only:
            durations = row_unkilled(c, table, s0)
        if "kills" in only and durations:
            rows_kills(c, table, s0, durations, per_phase)
        if "bad-inputs" in only:
            rows_bad_inputs(c, table, s0)
        if "two-sessions" in only:
            row_two_sessions(c, table, s0)
        if "rebind" in only:
            row_rebind_n(c, table, s0, runs)
        if "runner-killed" in only:
            s1 = row_runner_killed(c, table, s0)
            if s1 is None:          # the runner did not come back: boot it for the next row
                c.drop_host()
                if c.vfiotest("runner", "up", timeout=900).returncode == 0:
                    s1 = c.snapshot()
                    s1["controller sessions"] = s0["controller sessions"]
            s0 = s1 if s1 is not None else s0
        if "ssh-cut" in only:
            row_ssh_cut(c, table, s0)
    finally:
        c.drop_host()
        c.vfiotest("runner", "down", timeout=300)
        if not args.state_dir:
            shutil.rmtree(state, ignore_errors=True)
    bad = [r for r in table.rows if not r.ok]
    print(f"campaign: {len(table.rows) - len(bad)}/{len(table.rows)} rows at target in "
          f"{time.monotonic() - t0:.0f} s" + (f"; missed: {', '.join(r.name for r in bad)}" if bad else ""), flush=True)
    return 0 if table.ok and table.rows else 1


if __name__ == "__main__":
    sys.exit(main())
