"""Typed errors. Each message names the thing, the step, and what to do next."""


class HarnessError(Exception):
    """Base error. `hint` is the next step for the user; the CLI prints both."""

    exit_code = 2

    def __init__(self, message, hint=""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self):
        return f"{self.message}\n  next step: {self.hint}" if self.hint else self.message


class AddressError(HarnessError):
    """A PCI address that does not parse."""


class DeviceNotFound(HarnessError):
    """An address that names no device on the target."""


class NotAllowed(HarnessError):
    """A device outside the profile's allowlist, or one the host needs (root disk, SSH NIC)."""


class BindError(HarnessError):
    """Binding a device to a driver failed; the device was restored where possible."""


class UnbindError(HarnessError):
    """Unbinding a device failed."""


class VFCreateError(HarnessError):
    """Creating or removing SR-IOV virtual functions failed."""


class JournalError(HarnessError):
    """The restore journal is missing, corrupt, or belongs to another host."""


class LeaseBusy(HarnessError):
    """A device (IOMMU group) is held by another process."""


class TargetError(HarnessError):
    """The target host cannot be reached, or a command on it failed."""


class CommandTimeout(TargetError):
    """A command on the target did not finish in time."""


class ProvisionError(HarnessError):
    """A provisioning layer (runner, image, runtime) could not be built."""
