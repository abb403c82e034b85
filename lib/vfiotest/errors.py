"""Typed errors. Each message names the thing, the step, and what to do next.

Besides the message and the hint, an error carries what it is about as fields
(address, driver, group, path, cause, errno, reason; None when not known), so
callers match on those instead of on the message text:

    except JournalError as e:
        if e.reason == JournalError.HELD: ...

Each error class also says what kind of failure it is (`category`): the product under test
(the kernel, the drivers, Kata, podman, the guest hook: PRODUCT), the environment the run needs
(a target that cannot be reached, a device another session holds: ENVIRONMENT), or the harness
itself (HARNESS, the default). The pytest plugin fails a layer with that category in its
verdict (fixtures/layers.py layer_failed) and the reports class failures by it.
"""

from __future__ import annotations

from typing import Any

PRODUCT = "product"            # the subject failed: kernel, driver, Kata, podman, the guest hook
ENVIRONMENT = "environment"    # what the run needs is missing, unreachable, busy or misconfigured
HARNESS = "harness"            # the harness itself
CATEGORIES = (PRODUCT, ENVIRONMENT, HARNESS)


class HarnessError(Exception):
    """Base error. `hint` is the next step for the user; the CLI prints both.

    Fields (keyword arguments, all default None): address (PCI address), driver,
    group (IOMMU group), path (file on the target), cause (the underlying error),
    errno (the kernel's, when an OSError was behind it), reason (a subclass's own
    short code, see its constants); `category` overrides the class's for one error."""

    #: the CLI's exit status for this error (EXIT_CODES lists them all)
    exit_code = 1
    #: what kind of failure this is: PRODUCT, ENVIRONMENT or HARNESS (see the module doc)
    category = HARNESS

    def __init__(self, message: str, hint: str = "", *, address: str | None = None, driver: str | None = None,
                 group: str | None = None, path: str | None = None, cause: BaseException | str | None = None,
                 errno: int | None = None, reason: str | None = None, category: str | None = None) -> None:
        super().__init__(message)
        if category is not None:
            if category not in CATEGORIES:
                raise ValueError(f"unknown error category {category!r}: one of {CATEGORIES}")
            self.category = category
        self.message = message
        self.hint = hint
        self.address = address
        self.driver = driver
        self.group = group
        self.path = path
        self.cause = cause
        self.errno = errno
        self.reason = reason

    def fields(self) -> dict[str, Any]:
        """The fields that are set ({name: value}), for logs and reports."""
        names = ("address", "driver", "group", "path", "cause", "errno", "reason")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def __str__(self) -> str:
        return f"{self.message}\n  next step: {self.hint}" if self.hint else self.message


class AddressError(HarnessError):
    """A PCI address that does not parse."""

    category = ENVIRONMENT

    exit_code = 2


class DeviceNotFound(HarnessError):
    """An address that names no device on the target."""

    category = ENVIRONMENT

    exit_code = 4


class NotAllowed(HarnessError):
    """A device outside the profile's allowlist, or one the host needs (root disk, SSH NIC)."""

    category = ENVIRONMENT

    exit_code = 3

    PROTECTED = "protected"        # the host needs the device
    NOT_ALLOWLISTED = "allowlist"  # the profile does not allow its vendor:device
    GROUP = "group"                # its IOMMU group holds other endpoints (bind the group)
    PF_WITH_VFS = "pf-with-vfs"    # an SR-IOV PF with VFs enabled: unbinding its driver destroys them


class BindError(HarnessError):
    """Binding a device to a driver failed; the device was restored where possible."""

    category = PRODUCT

    exit_code = 8


class UnbindError(HarnessError):
    """Unbinding a device failed."""

    category = PRODUCT

    exit_code = 8


class VFCreateError(HarnessError):
    """Creating or removing SR-IOV virtual functions failed."""

    category = PRODUCT

    exit_code = 8

    IN_USE = "in-use"          # VFs bound to vfio-pci or leased
    TOO_MANY = "too-many"      # over sriov_totalvfs
    TIMEOUT = "timeout"        # the write did not return in time
    NOT_PF = "not-pf"          # no SR-IOV capability
    NO_DRIVER = "no-driver"    # the PF has no driver bound
    #: reasons checked before anything is written: the CLI reports them as refusals (exit 3)
    REFUSALS = (IN_USE, TOO_MANY, NOT_PF, NO_DRIVER)

    def __init__(self, message: str, hint: str = "", **fields: Any) -> None:
        super().__init__(message, hint, **fields)
        if self.reason in self.REFUSALS:
            self.exit_code = 3


class JournalError(HarnessError):
    """The restore journal is missing, corrupt, or belongs to another host."""

    exit_code = 6

    HELD = "held"                  # another live process holds it
    CORRUPT = "corrupt"            # does not parse, or an entry lacks fields
    FOREIGN = "foreign"            # written on another host
    UNKNOWN_KIND = "unknown-kind"  # an entry kind no module registers
    CLOSED = "closed"              # used after close()

    def __init__(self, message: str, hint: str = "", *, kind: str | None = None, **fields: Any) -> None:
        super().__init__(message, hint, **fields)
        #: the entry kind, for UNKNOWN_KIND
        self.kind = kind


class LeaseBusy(HarnessError):
    """A device (IOMMU group) is held by another process."""

    category = ENVIRONMENT

    exit_code = 7

    def __init__(self, message: str, hint: str = "", *, owner: dict[str, Any] | None = None, **fields: Any) -> None:
        super().__init__(message, hint, **fields)
        #: the holder's owner record (pid, controller, worker, session, test), when known
        self.owner = owner


class TargetError(HarnessError):
    """The target host cannot be reached, or a command on it failed."""

    category = ENVIRONMENT

    exit_code = 5


class CommandTimeout(TargetError):
    """A command on the target did not finish in time."""


class SessionStateError(HarnessError):
    """A session step asked out of order (vfiotest.session.TRANSITIONS): e.g. a baseline or an
    undo record after the session finished. A harness bug, not the target's: `reason` is the
    transition, "<from> -> <to>"."""


class ProvisionError(HarnessError):
    """A provisioning layer (runner, image, runtime) could not be built."""

    ABSENT = "absent"      # what it needs is not there at all (no bundle at the path): cannot exist here

    category = ENVIRONMENT

    exit_code = 9


#: The CLI's exit statuses, so a script can tell outcomes apart (`vfiotest --help` prints them).
EXIT_CODES = {
    0: "success",
    1: "a check failed (doctor), or another harness error",
    2: "usage: a bad option or argument (a malformed PCI address included)",
    3: "refused: the device is outside the allowlist, needed by the host, or a PF with VFs (nothing changed)",
    4: "not found: no such device on the target",
    5: "target unreachable, or a command on it timed out",
    6: "journal refused: corrupt, from another host, or held by a live process",
    7: "busy: another test or session holds the device's IOMMU group (or its PF, while changing its VF count)",
    8: "the change failed (bind, unbind, VF creation); the device was put back where possible",
    9: "provisioning failed (guest image, runtime registration, podman set-up)",
    130: "interrupted",
}
