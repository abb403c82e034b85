"""A podman-py client bound to one OCI runtime, that cleans up every container it made.

`RuntimeClient.open(host, runtime)` starts the API service for that runtime on the
target (vfiotest.podman.service), connects podman-py to it and checks `ping`.
`run()` creates, starts, waits for (with a timeout), collects the logs and the
inspect data of a container, then removes it; `start()` leaves it running.
Every container gets the label `vfiotest.owner=<token>`, so `cleanup()` finds
even the ones whose creation failed half-way.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shlex
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from ..constants import VFIO_ANNOTATION
from ..errors import ENVIRONMENT, PRODUCT, HarnessError
from .diagnose import guest_view, start_failure_details
from .service import PodmanService, service_entry, undo_service, wait_for_ping

if TYPE_CHECKING:
    from typing import Self

    from ..host import Host

log = logging.getLogger(__name__)

OWNER_LABEL = "vfiotest.owner"
VFIO_CONTAINER_DEV = "/dev/vfio/vfio"
# podman-py's run() returns None with the k8s-file driver (../shared/notes/facts.md §4); json-file works.
LOG_CONFIG = {"Type": "json-file", "Config": {}}


#: Kata 1.x's words when its agent did not answer the first gRPC call to a new VM
AGENT_CHECK_FAILED = "Failed to check if grpc server is working"
RETRIES_ENV = "VFIOTEST_KATA_START_RETRIES"
#: seconds podman-py waits for an answer from the API: longer than a Kata 1.x start can take
#: (the bundle's VM start, agent dial and check timeouts are 120 s each), so that a slow start
#: ends with Kata's own words, not with the HTTP client giving up half-way (seen in the
#: emulated runner under load: "POST operation failed" 120 s after the agent dial began)
API_TIMEOUT = 600
MAX_RETRIES = 3


def agent_check_retries(virtual: bool) -> int:
    """How often a container start that Kata refused with AGENT_CHECK_FAILED is tried again:
    $VFIOTEST_KATA_START_RETRIES (0 to 3), else 1 on the emulated runner (`virtual`) and 0
    elsewhere. In the emulated runner the Kata VM is nested inside a TCG-emulated machine
    and, on a loaded controller, was seen (about 1 start in 100) to lose the agent's
    connection before its first answer; on bare metal that error is the product's."""
    raw = os.environ.get(RETRIES_ENV, "").strip()
    if not raw:
        return 1 if virtual else 0
    if not raw.isdigit() or int(raw) > MAX_RETRIES:
        err = HarnessError(f"{RETRIES_ENV}={raw!r} is not a count from 0 to {MAX_RETRIES}",
                           hint=f"unset it (1 on the emulated runner, 0 elsewhere) or set 0..{MAX_RETRIES}",
                           category=ENVIRONMENT)
        err.exit_code = 2
        raise err
    return int(raw)


@dataclass
class StartRetry:
    """A container start Kata refused because its agent did not answer, and that was tried again."""

    id: str
    name: str
    error: str

    def __str__(self) -> str:
        return f"container {self.name} ({self.id[:12]}) did not start and was started again: {self.error}"


class ContainerError(HarnessError):
    """A container could not be created, started or waited for: the runtime (Kata, its guest hook)
    or podman refused it, a product failure unless the error says otherwise (a missing image)."""

    category = PRODUCT


@dataclass
class RunResult:
    """What a finished container left: exit code, logs, the runtime it ran on."""

    id: str
    name: str
    exit_code: Optional[int]
    stdout: str
    stderr: str
    oci_runtime: str
    state: Dict = field(default_factory=dict)
    inspect: Dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def json(self) -> Any:
        """The last JSON line the container printed on stdout (the probe's report)."""
        for line in reversed(self.stdout.strip().splitlines()):
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)
        raise ValueError(f"container {self.name} printed no JSON on stdout: {self.stdout[-300:]!r} / {self.stderr[-300:]!r}")

    def __str__(self) -> str:
        if self.exit_code is None:   # a start failure: stderr holds podman's error and the target's logs
            return f"container {self.name} ({self.oci_runtime}) did not start: {self.stderr}"
        return (f"container {self.name} ({self.oci_runtime}) exit {self.exit_code}\n--- stdout\n{self.stdout}"
                f"--- stderr\n{self.stderr}")


# With any ulimit given over the API podman drops containers.conf's default_ulimits, and
# its built-in nofile default exceeds the hard limit here (setrlimit EPERM): always send these.
BASE_ULIMITS = {"nofile": (20000, 20000), "nproc": (32768, 32768)}


def ulimit_list(ulimits: Mapping[str, int | tuple[int, int]] | None) -> list[dict[str, Any]]:
    """{'memlock': (soft, hard) or n} -> podman-py's [{'Name': 'memlock', 'Soft': s, 'Hard': h}]."""
    out = []
    merged: dict[str, int | tuple[int, int]] = dict(BASE_ULIMITS)
    merged.update({k.lower().replace("rlimit_", ""): v for k, v in (ulimits or {}).items()})
    for name, v in merged.items():
        soft, hard = (v, v) if isinstance(v, int) else v
        key = name.lower()  # podman adds the RLIMIT_ prefix itself
        out.append({"Name": key[len("rlimit_"):] if key.startswith("rlimit_") else key, "Soft": int(soft), "Hard": int(hard)})
    return out


def vfio_devices(dev_path: str) -> list[str]:
    """The two nodes a VFIO user needs: the container node and the group node."""
    return [VFIO_CONTAINER_DEV, dev_path]


DEV_MOUNT = {"type": "bind", "source": "/dev", "target": "/dev"}


def vfio_recipe(kata: bool, dev_path: str | None = None, vendor_device: str | None = None, dev_mount: bool = True,
                device: bool = True) -> dict[str, Any]:
    """podman-py create options that give a container the VFIO group `dev_path`.

    On Kata 1.x, the seed's recipe: `-v /dev:/dev` (Kata maps a /dev bind mount to the
    guest's /dev, where the guest hook made `/dev/vfio/<guest group>`), `--network none`,
    `--device <group node>` (Kata hot-plugs the group's devices into its VM and drops the
    node from the spec), and the annotation with the VF's `vendor_device` (the guest's PCI
    addresses are not the host's). Elsewhere (runc): the two nodes. `dev_mount`/`device`
    False leave a piece out (to break the subject on purpose)."""
    opts: dict[str, Any] = {"devices": [], "annotations": {}}
    if kata:
        opts["network_mode"] = "none"          # internetworking_model = "none" in our configuration.toml
        if dev_mount:
            opts["mounts"] = [dict(DEV_MOUNT)]
    if dev_path is not None:
        if device:
            opts["devices"] = [dev_path] if kata else vfio_devices(dev_path)
        if vendor_device:
            opts["annotations"][VFIO_ANNOTATION] = vendor_device
    return opts


def runtime_is_kata(host: Host, runtime: str, timeout: float = 60) -> bool:
    """Whether podman's `runtime` on `host` is Kata: the executable it resolves to says
    `kata-runtime` in its `--version` (a kata-vfio wrapper passes the flag on)."""
    res = host.run(["podman", "--runtime", runtime, "info", "--format", "{{.Host.OCIRuntime.Path}}"], timeout=timeout)
    path = res.stdout.strip().splitlines()[-1] if res.ok and res.stdout.strip() else ""
    if not path:
        return False
    ver = host.run([path, "--version"], timeout=timeout)
    return "kata-runtime" in ver.stdout + ver.stderr


class RuntimeClient:
    """podman-py bound to one runtime on one target. Use `open()`, and `close()` at the end."""

    def __init__(self, service: PodmanService, client: Any, owner: str | None = None, recorder: Any = None) -> None:
        self.service, self.client = service, client
        self.runtime = service.runtime
        self.owner = owner or secrets.token_hex(6)
        self.made: List[str] = []  # ids of every container created, in order
        #: where the containers' undo entry goes before the first is made (a journal or the session)
        self.recorder = recorder
        self._recorded = False
        #: the kata-vfio registration (vfiotest.kata.runtime.RuntimeInfo) the client was opened for, if any
        self.runtime_info: Any = None
        #: how often a start refused with AGENT_CHECK_FAILED is tried again (agent_check_retries)
        self.agent_check_retries = 0
        #: the starts that were tried again, in order (reported with the test that made them)
        self.retried: List[StartRetry] = []

    @classmethod
    def open(cls, host: Host, runtime: str, *, ping_timeout: float = 60.0, owner: str | None = None,
             recorder: Any = None, **service_kw: Any) -> RuntimeClient:
        """recorder: a journal (or vfiotest.session.Session) that gets, before each is made, the
        undo entries of the API service and of the containers, so a crashed harness leaves
        neither running (`vfiotest restore`)."""
        import podman

        service = PodmanService(host, runtime, **service_kw)
        if recorder is not None:
            recorder.record(service_entry(service))
        service.start()
        try:
            client = podman.PodmanClient(base_url=service.url, timeout=API_TIMEOUT)
            wait_for_ping(client, ping_timeout, service)
        except BaseException:
            service.stop()
            raise
        return cls(service, client, owner, recorder)

    # -- containers -------------------------------------------------------------
    def create(self, image: str, command: Iterable[str], *, devices: Iterable[str] = (), cap_add: Iterable[str] = (),
               cap_drop: Iterable[str] = (), ulimits: Mapping[str, int | tuple[int, int]] | None = None,
               annotations: Mapping[str, str] | None = None, name: str | None = None,
               labels: Mapping[str, str] | None = None, **extra: Any) -> Any:
        """A created (not started) container; tracked for cleanup."""
        from podman.errors import APIError, ImageNotFound

        name = name or f"vfiotest-{self.owner}-{len(self.made)}"
        if self.recorder is not None and not self._recorded:
            self.recorder.record(containers_entry(self.runtime, self.owner))
            self._recorded = True
        kw = dict(devices=list(devices), cap_add=list(cap_add), cap_drop=list(cap_drop), ulimits=ulimit_list(ulimits),
                  annotations=dict(annotations or {}), labels={OWNER_LABEL: self.owner, **(labels or {})},
                  name=name, log_config=LOG_CONFIG, **extra)
        try:
            c = self.client.containers.create(image, command=list(command), **kw)
        except ImageNotFound as e:
            raise ContainerError(f"image {image!r} is not on {self.service.host.name}: {e}",
                                 hint="build and import it: `vfiotest image build` (or pass --image with an image that exists there)",
                                 category=ENVIRONMENT) from e
        except APIError as e:
            self._forget_by_name(name)
            raise ContainerError(f"podman could not create container {name} ({self.runtime}): {e.explanation or e}",
                                 hint=f"devices {list(devices)} must exist on the target; read `podman --runtime {self.runtime} create` errors there") from e
        self.made.append(c.id)
        return c

    def _forget_by_name(self, name: str) -> None:
        # a failed create can leave a half-made container behind: find it by name
        try:
            for c in self.client.containers.list(all=True, filters={"name": name}):
                self.made.append(c.id)
        except Exception:  # noqa: BLE001 - cleanup() will look by label anyway
            pass

    def _start_error(self, c: Any, e: Exception) -> str:
        """What to say when `c` did not start: the API's words, the service log's tail (the API's
        message is often just "exit status 1"), the runtime's and the kernel's log lines."""
        why = str(getattr(e, "explanation", None) or e)
        if _timed_out(e):
            why += f" (podman's API did not answer within {API_TIMEOUT} s: {e.__cause__})"
        return why + self._target_logs(c)

    def _target_logs(self, c: Any, guest: str = "") -> str:
        """The service log's tail, then `guest` (a section of its own when given), then the
        runtime's and the kernel's log lines about `c`: what start and wait failures append."""
        tail = self.service.log_tail(8)
        parts = ["\n--- podman service log (tail)\n" + tail] if tail else []
        if guest:
            parts.append("\n--- the Kata guest, over its debug console\n" + guest)
        return "".join(parts) + start_failure_details(self.service.host, c.id)

    def _stuck_details(self, c: Any) -> str:
        """What to say about a container that did not exit in time: what it printed so far (both
        streams, one call), then _target_logs with a Kata guest's own view (memory, processes,
        kernel; over its debug console). Never raises."""
        try:
            printed = _text(c.logs(stdout=True, stderr=True)).strip()
        except Exception as e:  # noqa: BLE001 - the details must not hide the failure they explain
            printed = f"(could not be read: {e})"
        try:
            guest = guest_view(self.service.host, c.id)
        except Exception as e:  # noqa: BLE001 - the details must not hide the failure they explain
            guest = f"(its debug console did not answer: {e})"
        head = "\n--- its output so far (tail)\n" + "\n".join(printed.splitlines()[-15:]) if printed else ""
        return head + self._target_logs(c, guest)

    def _started(self, image: str, command: list[str], kw: dict[str, Any]) -> tuple[Any, str | None]:
        """Create and start a container: (container, None), or (container, why) when it did not
        start. A start Kata refused with AGENT_CHECK_FAILED is tried again, with a new container,
        up to `agent_check_retries` times; each is logged and kept in `retried`."""
        from podman.errors import APIError

        for attempt in range(self.agent_check_retries + 1):
            c = self.create(image, command, **kw)
            try:
                c.start()
                return c, None
            except APIError as e:
                why = self._start_error(c, e)
            if AGENT_CHECK_FAILED not in why or attempt == self.agent_check_retries:
                return c, why
            first = why.splitlines()[0]
            self.retried.append(StartRetry(c.id, c.name, why))
            log.warning("[vfiotest] %s: the Kata agent did not answer in container %s (%s); starting it again "
                        "(%s, %d of %d)", self.runtime, c.name, first, RETRIES_ENV, attempt + 1,
                        self.agent_check_retries)
            try:
                self.remove(c.id)
            except Exception as e:  # noqa: BLE001 - cleanup() tries again at the end; the start goes on
                log.warning("removing the refused container %s: %s", c.name, e)
        raise AssertionError("unreachable")

    def start(self, image: str, command: Iterable[str], **kw: Any) -> Any:
        """Create and start a container; it keeps running. Raises ContainerError if start fails."""
        c, why = self._started(image, list(command), kw)
        if why is not None:
            raise ContainerError(f"container {c.name} did not start on runtime {self.runtime}: {why}",
                                 hint="the runtime's error is above; run the same with `podman --runtime ... run` on the target")
        c.reload()
        return c

    def run(self, image: str, command: Iterable[str], *, timeout: float = 180.0, keep: bool = False,
            **kw: Any) -> RunResult:
        """Run to completion and collect a RunResult (start failures are results too: exit_code None
        and the error in stderr). The container is removed unless `keep`."""
        from podman.errors import APIError

        t0 = time.monotonic()
        c, start_error = self._started(image, list(command), kw)
        try:
            exit_code = None
            if start_error is None:
                try:
                    exit_code = c.wait(condition=["exited", "stopped"], timeout=timeout)
                except APIError as e:
                    if _timed_out(e):
                        raise ContainerError(
                            f"container {c.name} did not exit within {timeout:g} s on runtime {self.runtime} "
                            f"(it is removed now){self._stuck_details(c)}",
                            hint="a container stuck in a Kata guest: the runtime's and the kernel's lines are above; "
                                 "run the same command with `podman --runtime ... run` on the target to watch it") from e
                    raise ContainerError(f"waiting for container {c.name} failed: {e}", hint="see the target's podman service log") from e
            elapsed = time.monotonic() - t0
            if isinstance(exit_code, dict):  # some podman-py versions return the whole body
                exit_code = exit_code.get("StatusCode")
            stdout = _text(c.logs(stdout=True, stderr=False)) if start_error is None else ""
            stderr = _text(c.logs(stdout=False, stderr=True)) if start_error is None else start_error
            c.reload()
            attrs = c.attrs
            return RunResult(c.id, c.name, exit_code, stdout, stderr, attrs.get("OCIRuntime", ""),
                             attrs.get("State", {}), attrs, elapsed)
        finally:
            if not keep:
                self.remove(c.id)

    def exec(self, container: Any, command: Iterable[str], timeout: float = 60.0) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) of a command in a running container."""
        rc, out = container.exec_run(list(command), demux=True)
        out, err = out if isinstance(out, tuple) else (out, b"")
        return rc, _text(out), _text(err)

    def remove(self, cid: str, timeout: float = 30) -> None:
        from podman.errors import NotFound

        try:
            self.client.containers.get(cid).remove(force=True, v=True, timeout=timeout)
        except NotFound:
            pass

    def leftovers(self) -> list[Any]:
        """Containers with our owner label still present (should be none after cleanup)."""
        return self.client.containers.list(all=True, filters={"label": f"{OWNER_LABEL}={self.owner}"})

    def cleanup(self) -> list[str]:
        """Remove every container this client made; returns the ids removed. Never raises for
        a container already gone."""
        removed = []
        ids = list(dict.fromkeys(self.made))
        try:
            ids += [c.id for c in self.leftovers() if c.id not in ids]
        except Exception as e:  # noqa: BLE001 - still remove what we know about
            log.warning("listing containers of %s: %s", self.owner, e)
        for cid in ids:
            try:
                self.remove(cid)
                removed.append(cid)
            except Exception as e:  # noqa: BLE001 - try every one, report at the end
                log.warning("removing container %s: %s", cid[:12], e)
        try:
            reap(self.service.host, removed)
        except HarnessError as e:
            log.warning("reaping what outlived containers %s: %s", [c[:12] for c in removed], e)
        self.made.clear()
        return removed

    def image_exists(self, ref: str) -> bool:
        return self.client.images.exists(ref)

    def info(self) -> dict[str, Any]:
        return self.client.info()

    def close(self) -> None:
        """Remove our containers, close the client, stop the service."""
        try:
            self.cleanup()
        finally:
            try:
                self.client.close()
            finally:
                self.service.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _timed_out(e: BaseException) -> bool:
    """Whether an API error is the client's own timeout (podman-py wraps the transport's
    exception, requests' ReadTimeout over http+unix and ssh alike, as an APIError's cause)."""
    import socket

    from requests.exceptions import Timeout

    cause = e.__cause__
    return isinstance(cause, (Timeout, socket.timeout)) or "timed out" in str(cause or "").lower()


def _text(out: str | bytes | bytearray | Iterable[bytes | str] | None) -> str:
    if out is None:
        return ""
    if isinstance(out, (bytes, bytearray)):
        return out.decode("utf-8", "replace")
    if isinstance(out, str):
        return out
    return b"".join(x if isinstance(x, bytes) else str(x).encode() for x in out).decode("utf-8", "replace")


# -- undo after a crash (vfiotest.journal kinds) ------------------------------------------
def containers_entry(runtime: str, owner: str) -> dict[str, Any]:
    """The journal entry written before a client's first container: every container with its
    owner label is removed on undo, with its Kata VM."""
    return {"kind": "containers", "runtime": runtime, "label": f"{OWNER_LABEL}={owner}"}


def reap(host: Host, ids: Iterable[str]) -> None:
    """Kill what outlives removed containers: a Kata VM (its qemu names the sandbox, which is
    the container's id) and the conmon of an exec session (podman keeps it up to 5 min after
    the exec, `--exit-delay 300`, even once the container is gone)."""
    words = []
    for cid in ids:
        if not cid.isalnum():
            continue
        words += [f"pkill -KILL -f {shlex.quote('[s]andbox-' + cid)};",
                  f"pkill -KILL -f {shlex.quote('[c]onmon .*-c ' + cid + ' ')};"]
    if words:
        host.run(" ".join(words) + " true", timeout=60)


def undo_containers(host: Host, entry: dict[str, Any]) -> None:
    """Remove every container labelled `entry["label"]` (force: a running one is stopped, its
    Kata sandbox VM with it); a Kata VM that outlives its container (its qemu names the sandbox,
    which is the container's id) is killed. Needs the runtime still registered: undo entries
    run newest first, and the registration was recorded before any container."""
    label = entry["label"]
    if not label.startswith(OWNER_LABEL + "=") or not label[len(OWNER_LABEL) + 1:].isalnum():
        raise ContainerError(f"the containers entry names label {label!r}, not {OWNER_LABEL}=<hex>; it is refused",
                             hint="the journal was edited by hand: remove that entry")
    ls = host.run(["podman", "ps", "-a", "-q", "--no-trunc", "--filter", f"label={label}"], timeout=120,
                  check=True, what=f"listing the containers labelled {label}")
    ids = [i for i in ls.stdout.split() if i.isalnum()]
    for cid in ids:
        host.run(["podman", "rm", "-f", "-v", "--time", "10", cid], timeout=180)
    reap(host, ids)
    # the conmon of an exec session outlives its container by up to 5 min; when the harness died
    # right after removing the container itself, only the container's name (which carries the
    # owner) still finds it
    owner = label[len(OWNER_LABEL) + 1:]
    host.run(f"pkill -KILL -f {shlex.quote('[c]onmon .* -n vfiotest-' + owner + '-[0-9]+ ')}; true", timeout=60)
    left = host.run(["podman", "ps", "-a", "-q", "--filter", f"label={label}"], timeout=120)
    if left.ok and left.stdout.split():
        raise ContainerError(f"containers {left.stdout.split()} (label {label}) could not be removed on {host.name}",
                             hint=f"remove them by hand: podman rm -f {' '.join(left.stdout.split())}")


#: the journal entry kinds this module and the service own (vfiotest.journal.register_kind arguments)
JOURNAL_KINDS = [
    {"kind": "containers", "required": ("runtime", "label"), "undo": undo_containers},
    {"kind": "podman-service", "required": ("socket", "pid_path"), "undo": undo_service},
]
