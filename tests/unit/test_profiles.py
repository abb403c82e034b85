import pytest

from vfiotest.profiles import SEED_IDS, UnknownProfile, get_profile, normalise_id


def test_seed_and_emulated():
    seed, emu = get_profile("seed"), get_profile("emulated")
    assert set(SEED_IDS) == {"8086:1521", "8086:1520", "8086:158b", "15b3:1015", "15b3:1017"}
    assert set(SEED_IDS) <= seed.ids
    assert not seed.allows("8086:10c9") and not seed.allows("1b36:0010")
    assert emu.ids == seed.ids | {"8086:10c9", "8086:10ca", "1b36:0010"}
    assert emu.allows("0x8086:0x10CA") and emu.vf_ids["8086:10c9"] == "8086:10ca"
    assert seed.cgroup_mode == "v1"


def test_unknown_profile():
    with pytest.raises(UnknownProfile, match="'nope'") as e:
        get_profile("nope")
    assert "emulated" in e.value.hint and "seed" in e.value.hint


def test_normalise_id():
    assert normalise_id("8086 10ca") == normalise_id("0x8086:0x10CA") == "8086:10ca"
