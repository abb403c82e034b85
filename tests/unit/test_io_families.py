"""The VF families of the profiles and their I/O checks (vfiotest.io_families)."""

from vfiotest import io_families
from vfiotest.podman.image import DPDK_PLUGINS
from vfiotest.profiles import get_profile


def test_every_vf_of_the_profiles_has_a_family_and_none_passes_without_a_check():
    for name in ("seed", "emulated"):
        for fam in io_families.families(get_profile(name)):
            assert fam.check in ("nic", "nvme", None)
            assert fam.check is not None or fam.reason, fam          # no check: the reason is said
            if fam.check == "nic":
                assert fam.pmd and fam.plugin in DPDK_PLUGINS, fam   # its PMD is in the DPDK image


def test_the_seed_profiles_families():
    by_id = {f.vf_id: f for f in io_families.families(get_profile("seed"))}
    assert by_id["8086:1520"].pmd == "net_e1000_igb_vf"      # I350 VF
    assert by_id["8086:154c"].pmd == "net_iavf"              # XXV710 VF
    assert by_id["15b3:1016"].check is None and "vfio-pci" in by_id["15b3:1016"].reason   # mlx5
    assert by_id["15b3:1018"].check is None


def test_an_unknown_vf_is_a_family_without_a_check():
    fam = io_families.family_of("0x1234:0x5678")
    assert fam.vf_id == "1234:5678" and fam.check is None and "no I/O check" in fam.reason
