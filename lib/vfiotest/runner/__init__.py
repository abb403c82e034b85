"""The emulated SR-IOV runner: a QEMU/TCG VM with a vIOMMU, an igb and an NVMe SR-IOV PF,
the controller's root shared read-only, reached over SSH with pinned keys (docs/runner.md)."""

from .runner import Runner, free_port, qemu_rss

__all__ = ["Runner", "free_port", "qemu_rss"]
