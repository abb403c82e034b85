"""Device profiles: which vendor:device IDs the harness may touch, and what the host should look like.

`seed` is the list of the tool set the harness replaces (8086:1521 8086:1520
8086:158b 15b3:1015 15b3:1017) plus the VF IDs of those PFs, since a VF carries
its own ID and is what gets passed through. `emulated` adds what the QEMU
runner has: igb 8086:10c9 (PF) / 8086:10ca (VF) and NVMe 1b36:0010.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, FrozenSet

from .errors import HarnessError

SEED_IDS = ("8086:1521", "8086:1520", "8086:158b", "15b3:1015", "15b3:1017")

# PF -> VF vendor:device of the seed's PFs (the IDs the Linux VF drivers claim).
SEED_VF_IDS = {
    "8086:1521": "8086:1520",  # I350 -> I350 VF (igbvf); already in the seed's list
    "8086:158b": "8086:154c",  # XXV710 -> 700-series VF (iavf)
    "15b3:1015": "15b3:1016",  # ConnectX-4 Lx -> its VF (mlx5_core)
    "15b3:1017": "15b3:1018",  # ConnectX-5 -> its VF (mlx5_core)
}

EMULATED_VF_IDS = {"8086:10c9": "8086:10ca", "1b36:0010": "1b36:0010"}


class UnknownProfile(HarnessError):
    """A profile name that is not defined."""

    exit_code = 2       # a usage error


@dataclass(frozen=True)
class Profile:
    """What the harness may touch on a host, and what it expects of it.

    ids: vendor:device IDs that may be rebound or have VFs created.
    vf_ids: PF ID -> the ID its VFs carry.
    cgroup_mode: "v1" (the seed's systemd.unified_cgroup_hierarchy=0), "v2", or "any".
    kernel_args: arguments the host's command line should have.
    allow_unsafe_interrupts: where interrupt remapping is missing, VFIO may be told to do without
      it (vfio_iommu_type1 allow_unsafe_interrupts=1, which --allow-reboot sets as a kernel argument).
    """

    name: str
    ids: FrozenSet[str]
    vf_ids: Dict[str, str] = field(default_factory=dict)
    cgroup_mode: str = "any"
    kernel_args: tuple = ("intel_iommu=on",)
    allow_unsafe_interrupts: bool = False
    description: str = ""

    def allows(self, vendor_device: str) -> bool:
        return normalise_id(vendor_device) in self.ids

    @property
    def pf_ids(self) -> frozenset[str]:
        """IDs of the profile that can have VFs."""
        return frozenset(self.vf_ids)

    def __str__(self) -> str:
        return f"{self.name} ({', '.join(sorted(self.ids))})"


def normalise_id(text: object) -> str:
    """`0x8086:0x10CA`, `8086 10ca` -> `8086:10ca`."""
    parts = str(text).replace(" ", ":").lower().split(":")
    parts = [p[2:] if p.startswith("0x") else p for p in parts if p]
    return ":".join(p.zfill(4) for p in parts)


PROFILES = {
    "seed": Profile(
        name="seed",
        ids=frozenset(SEED_IDS) | frozenset(SEED_VF_IDS.values()),
        vf_ids=dict(SEED_VF_IDS),
        cgroup_mode="v1",
        kernel_args=("intel_iommu=on", "systemd.unified_cgroup_hierarchy=0"),
        description="the seed's five IDs (Intel I350/XXV710, Mellanox ConnectX-4 Lx/5) and their VFs",
    ),
}
PROFILES["emulated"] = Profile(
    name="emulated",
    ids=PROFILES["seed"].ids | frozenset(EMULATED_VF_IDS) | frozenset(EMULATED_VF_IDS.values()),
    vf_ids={**SEED_VF_IDS, **EMULATED_VF_IDS},
    cgroup_mode="any",
    kernel_args=("intel_iommu=on",),
    allow_unsafe_interrupts=True,     # a VM: no device can forge interrupts there
    description="seed plus QEMU's igb (8086:10c9 PF, 8086:10ca VF) and NVMe (1b36:0010)",
)


def get_profile(name: str | Profile) -> Profile:
    """The Profile called `name`; UnknownProfile names the ones that exist."""
    if isinstance(name, Profile):
        return name
    try:
        return PROFILES[str(name).strip().lower()]
    except KeyError:
        raise UnknownProfile(f"unknown device profile {name!r}",
                             hint=f"use one of: {', '.join(sorted(PROFILES))} (--profile NAME)") from None


__all__ = ["Profile", "PROFILES", "SEED_IDS", "get_profile", "normalise_id", "UnknownProfile"]
