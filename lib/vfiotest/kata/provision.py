"""The Kata layers' provisioning steps, shared by the fixtures and `vfiotest kata register`:
the guest image for a KataChoice, its configuration.toml, the kata-vfio registration."""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ..errors import ProvisionError
from . import config as kata_config
from . import initrd, runtime
from .bundle import BUILD_SCRIPT, REQUIRED, find_bundle

if TYPE_CHECKING:
    from ..host import Host
    from .bundle import KataChoice


def guest_image(choice: KataChoice, allowed_ids: Iterable[str], host: Host | None = None,
                shares_controller_fs: bool = True, hook: bool = True, progress: Callable[[str], None] | None = None) -> initrd.BuiltInitrd:
    """The Kata guest initrd for `choice` (vfiotest.kata.bundle.KataChoice, a Kata 1.x): kata-agent
    (from the bundle) as PID 1 behind the harness's init, and the hook. Staged on `host` when
    it does not read this machine's files. ProvisionError when there is no kata-agent to put in."""
    source = (choice.bundle or find_bundle(progress=progress)) if choice.supported else None
    if source is None:
        raise ProvisionError("the Kata guest image needs a kata-agent and no Kata 1.x bundle was found",
                             hint=f"set VFIOTEST_KATA_BUNDLE to a Kata 1.x bundle (build one with {BUILD_SCRIPT}, "
                                  f"see its README.md); `vfiotest kata detect` says what was found")
    spec = initrd.InitrdSpec(allowed_ids=tuple(allowed_ids), agent=source.agent, hook=hook)
    built = initrd.build_initrd(spec, progress=progress)
    if host is not None and not shares_controller_fs:
        initrd.stage_on_target(host, built, progress=progress)
    else:
        built.target_path, built.target_kernel = built.path, built.kernel
    return built


def runtime_install(choice: KataChoice) -> runtime.KataInstall:
    """The runtime.KataInstall the kata-vfio wrapper runs. ProvisionError when `choice` is not a Kata 1.x."""
    if not choice.supported:
        raise ProvisionError(f"no Kata 1.x for kata-vfio: {choice.reason}",
                             hint=f"set VFIOTEST_KATA_BUNDLE to a Kata 1.x bundle (build one with {BUILD_SCRIPT})")
    return runtime.KataInstall(choice.runtime_path, choice.version, choice.major)


def write_config(host: Host, choice: KataChoice, image: initrd.BuiltInitrd,
                 memory_mb: int | None = None) -> kata_config.WrittenConfig:
    """configuration.toml for kata-vfio on `host`, derived from the bundle's (or the installed)
    configuration, for `image` (a BuiltInitrd staged for the target); the guest's memory
    `memory_mb`, else kata_config.guest_memory_mb() (VFIOTEST_KATA_MEMORY, else the default)."""
    res = host.run(["sh", "-c", "command -v qemu-system-x86_64"], timeout=15)
    root = choice.target_root
    def in_bundle(role: str) -> str | None:
        return posixpath.join(root, REQUIRED[role]) if root else None

    settings = kata_config.KataVfioSettings.for_kata_guest(
        kernel=image.target_kernel, initrd=image.target_path, init=image.init,  # type: ignore[arg-type]  # set by guest_image()
        hypervisor_path=res.stdout.strip() or None, shim_path=in_bundle("shim"), proxy_path=in_bundle("proxy"),
        kata_major=choice.major, default_memory=memory_mb)
    return kata_config.write_kata_vfio_config(host, settings, base_path=in_bundle("config"))


def register_kata_vfio(host: Host, choice: KataChoice, image: initrd.BuiltInitrd, recorder: Any,
                       progress: Callable[[str], None] = lambda s: None,
                       memory_mb: int | None = None) -> runtime.RuntimeInfo:
    """The kata-vfio registration, the one way both the session (Session.register_kata_vfio) and
    `vfiotest kata register` make it: what it replaces is recorded in `recorder` (a session's
    records or the CLI's journal) before anything is written, the derived configuration.toml
    included; then the configuration, the wrapper and the drop-in; then podman is asked to
    resolve the runtime (RuntimeRegistration.verify). ProvisionError (or another HarnessError)
    when a step fails; what was recorded puts it back."""
    reg = runtime.RuntimeRegistration(host, kata=runtime_install(choice))
    reg.snapshot()
    recorder.record(runtime.registration_record(reg, kata_config.KATA_VFIO_CONFIG))
    written = write_config(host, choice, image, memory_mb)
    progress(f"kata-vfio configuration {written.path} derived from {written.source} "
             f"(guest memory {memory_mb or kata_config.guest_memory_mb()} MiB)")
    info = reg.register()
    reg.verify()
    return info
