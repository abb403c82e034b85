"""Which I/O check a VF gets, by its vendor:device: the VF families of the profiles.

Every VF ID a profile may pass through (its `vf_ids` values) is mapped here to the check
`suites/podman_run/test_vf_io.py` runs on it inside the Kata container:

- "nvme": the harness's userspace NVMe driver over VFIO (podman/nvme_io.py);
- "nic": DPDK's testpmd over VFIO with the family's PMD (`pmd`; the plugin must be in the DPDK
  image, vfiotest.podman.image.DPDK_PLUGINS);
- None: no I/O check, with the reason. The tests report such a family as skipped with that
  reason, never as a pass.

A VF ID missing from this table is a family with no I/O check too (`family_of` says so).
"""

from __future__ import annotations

from dataclasses import dataclass

from .profiles import Profile, normalise_id


@dataclass(frozen=True)
class Family:
    """The I/O check of one VF family."""

    vf_id: str
    name: str
    check: str | None          # "nvme", "nic", or None (no I/O check: `reason` says why)
    pmd: str = ""              # DPDK PMD for "nic"
    plugin: str = ""           # the DPDK plugin file that has it (in the DPDK image)
    reason: str = ""


FAMILIES = {f.vf_id: f for f in (
    Family("1b36:0010", "QEMU NVMe (emulated runner)", "nvme"),
    Family("8086:10ca", "Intel 82576 VF, igbvf (emulated runner's igb)", "nic", pmd="net_e1000_igb_vf",
           plugin="librte_net_e1000.so.23.0"),
    Family("8086:1520", "Intel I350 VF, igbvf", "nic", pmd="net_e1000_igb_vf", plugin="librte_net_e1000.so.23.0"),
    Family("8086:154c", "Intel 700-series VF (XXV710), iavf", "nic", pmd="net_iavf", plugin="librte_net_iavf.so.23.0"),
    Family("15b3:1016", "Mellanox ConnectX-4 Lx VF, mlx5", None,
           reason="mlx5 VFs are not driven over vfio-pci: DPDK's mlx5 PMD runs beside the kernel's mlx5_core "
                  "(bifurcated), so a VF passed through /dev/vfio has no userspace driver to run"),
    Family("15b3:1018", "Mellanox ConnectX-5 VF, mlx5", None,
           reason="mlx5 VFs are not driven over vfio-pci: DPDK's mlx5 PMD runs beside the kernel's mlx5_core "
                  "(bifurcated), so a VF passed through /dev/vfio has no userspace driver to run"),
)}


def family_of(vf_id: str) -> Family:
    """The family of VF ID `vf_id`; one with no I/O check (and the reason) when it is not known."""
    vf_id = normalise_id(vf_id)
    return FAMILIES.get(vf_id) or Family(vf_id, f"VF {vf_id}", None,
                                         reason=f"no I/O check is written for VF {vf_id} (vfiotest.io_families)")


def families(profile: Profile) -> list[Family]:
    """The families of the VF IDs `profile` may pass through, in ID order."""
    return [family_of(v) for v in sorted(set(profile.vf_ids.values()))]


__all__ = ["Family", "FAMILIES", "family_of", "families"]
