"""The emulated runner's boot configuration (its GRUB defaults) and how a reboot is recognised."""

import pytest

from vfiotest.errors import ProvisionError
from vfiotest.runner import bootcfg


def test_default_file_has_the_arguments_the_runner_always_had():
    text = bootcfg.default_grub()
    assert bootcfg.grub_args(text) == ["intel_iommu=on", "systemd.unified_cgroup_hierarchy=0"]
    assert bootcfg.linux_args(text) == ["intel_iommu=on", "systemd.unified_cgroup_hierarchy=0"]


def test_grub_args_are_linux_then_linux_default_last_assignment_wins():
    text = ('GRUB_CMDLINE_LINUX="a=1"\nGRUB_CMDLINE_LINUX_DEFAULT="quiet"\n'
            "# GRUB_CMDLINE_LINUX=\"commented=1\"\nGRUB_CMDLINE_LINUX='intel_iommu=on b'\n")
    assert bootcfg.grub_args(text) == ["intel_iommu=on", "b", "quiet"]
    assert bootcfg.grub_args("GRUB_TIMEOUT=5\n") == []


@pytest.mark.parametrize("line,match", [
    ('GRUB_CMDLINE_LINUX="a; reboot"', "refusing kernel argument"),
    ('GRUB_CMDLINE_LINUX="$(id)"', "refusing kernel argument"),
    ('GRUB_CMDLINE_LINUX="unterminated', "cannot be read"),
    ('GRUB_CMDLINE_LINUX="a" b', "outside its quotes"),
    ('GRUB_CMDLINE_LINUX="console=tty0"', "the runner sets console itself"),
    ('GRUB_CMDLINE_LINUX="vfiotest.state=/x"', "the runner sets"),
])
def test_a_file_the_runner_cannot_boot_with_is_refused_with_the_reason(line, match):
    with pytest.raises(ProvisionError, match=match):
        bootcfg.grub_args(line + "\n", path="/s/etc-default/grub")


def test_edit_removes_adds_and_replaces_by_name_keeping_the_rest():
    text = bootcfg.default_grub()
    out = bootcfg.edit(text, without=["intel_iommu=on"])
    assert bootcfg.linux_args(out) == ["systemd.unified_cgroup_hierarchy=0"]
    assert out.replace('GRUB_CMDLINE_LINUX="systemd.unified_cgroup_hierarchy=0"',
                       'GRUB_CMDLINE_LINUX="intel_iommu=on systemd.unified_cgroup_hierarchy=0"') == text
    out = bootcfg.edit(out, with_=[bootcfg.CGROUP_ARGS["v2"], "intel_iommu=on"])
    assert bootcfg.linux_args(out) == ["systemd.unified_cgroup_hierarchy=1", "intel_iommu=on"]
    # a bare name removes every value of it
    assert bootcfg.linux_args(bootcfg.edit(out, without=["systemd.unified_cgroup_hierarchy"])) == ["intel_iommu=on"]
    # an argument that is not there is no error and changes nothing
    assert bootcfg.edit(out, without=["quiet"]) == out
    with pytest.raises(ProvisionError):
        bootcfg.edit(out, with_=["x;y"])
    with pytest.raises(ProvisionError):
        bootcfg.edit(out, without=["x y"])


def test_set_grub_args_appends_when_absent_and_keeps_one_assignment():
    assert bootcfg.set_grub_args("GRUB_TIMEOUT=5", ["a"]) == 'GRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX="a"\n'
    two = 'GRUB_CMDLINE_LINUX="x"\nGRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX="y"\n'
    assert bootcfg.set_grub_args(two, ["z"]) == 'GRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX="z"\n'


def test_append_puts_the_runner_arguments_first():
    base = bootcfg.runner_args("/s/runner", "/m", "tag")
    out = bootcfg.append(base, bootcfg.edit(bootcfg.default_grub(), without=["intel_iommu=on"]))
    assert out.split()[: len(base)] == base
    assert out.split()[len(base):] == ["systemd.unified_cgroup_hierarchy=0"]


@pytest.mark.parametrize("console,kind", [
    ("[    1.0] booting\n[   30.1] reboot: Restarting system\n", "restart"),
    ("[   30.1] reboot: Power down\n", "power-off"),
    ("vfiotest-init: FAILED: x\n[ 2.0] reboot: System halted\n", "halt"),
    ("[ 9.0] Kernel panic - not syncing: Attempted to kill init!\n", None),
    ("[ 9.0] all fine, still running (or SIGKILLed)\n", None),
    ("", None),
])
def test_last_reboot_line_decides_whether_the_supervisor_boots_it_again(console, kind):
    assert bootcfg.last_reboot(console) == kind


def test_a_tcg_runner_gets_godebug_for_its_sessions_and_a_bad_value_is_refused():
    assert bootcfg.runner_args("/s", "/m", "tag")[-1] == "vfiotest.modules=/m"     # none asked: none given
    assert bootcfg.runner_args("/s", "/m", "tag", godebug="cpu.all=off")[-1] == "vfiotest.godebug=cpu.all=off"
    with pytest.raises(ValueError, match="GODEBUG"):
        bootcfg.runner_args("/s", "/m", "tag", godebug="x;reboot")


@pytest.mark.parametrize("env, accel, want", [
    ({}, "tcg", bootcfg.TCG_GODEBUG),            # the default under TCG
    ({}, "kvm", None),                           # and none under KVM
    ({bootcfg.GODEBUG_ENV: "none"}, "tcg", None),
    ({bootcfg.GODEBUG_ENV: ""}, "tcg", None),
    ({bootcfg.GODEBUG_ENV: " cpu.avx2=off "}, "kvm", "cpu.avx2=off"),
])
def test_the_runners_godebug_comes_from_the_environment_else_the_accelerator(env, accel, want):
    assert bootcfg.runner_godebug(accel, env) == want


def test_a_godebug_setting_that_could_reach_a_shell_is_refused_by_name():
    with pytest.raises(ProvisionError, match=bootcfg.GODEBUG_ENV) as e:
        bootcfg.runner_godebug("tcg", {bootcfg.GODEBUG_ENV: "x $(reboot)"})
    assert "unset it" in e.value.hint


def test_the_image_store_reaches_the_kernel_line_only_as_a_plain_absolute_path():
    store = bootcfg.IMAGE_STORE_MOUNT
    assert bootcfg.runner_args("/s", "/m", "tag", image_store=store)[-1] == f"vfiotest.images={store}"
    assert not any(a.startswith("vfiotest.images=") for a in bootcfg.runner_args("/s", "/m", "tag"))
    for bad in ("relative/store", "/a b", "/x;reboot", "/x$(id)"):
        with pytest.raises(ValueError, match="image store"):
            bootcfg.runner_args("/s", "/m", "tag", image_store=bad)


@pytest.mark.parametrize("env, want", [({}, True), ({bootcfg.IMAGE_STORE_ENV: "0"}, False),
                                       ({bootcfg.IMAGE_STORE_ENV: " off "}, False), ({bootcfg.IMAGE_STORE_ENV: "1"}, True)])
def test_the_image_store_is_on_unless_the_environment_turns_it_off(env, want):
    assert bootcfg.image_store_wanted(env) is want


def test_storage_conf_without_one_names_the_driver_and_the_store():
    import tomllib

    conf = tomllib.loads(bootcfg.storage_conf("/c/images/x.store"))
    # containers/storage passes an additional store to the driver as "<driver>.imagestore=": no
    # driver named, no store used
    assert conf["storage"]["driver"] == "overlay"
    assert conf["storage"]["graphroot"] == "/var/lib/containers/storage"
    assert conf["storage"]["options"]["additionalimagestores"] == ["/c/images/x.store"]


def test_storage_conf_keeps_the_controllers_settings_comments_and_stores():
    import tomllib

    existing = ('# site settings\n[storage]\ndriver = "overlay"\ngraphroot = "/srv/containers"  # big disk\n\n'
                '[storage.options]\nadditionalimagestores = ["/srv/ro"]\n\n[storage.options.overlay]\nmountopt = "nodev"\n')
    text = bootcfg.storage_conf("/c/x.store", existing)
    assert "# site settings" in text and "# big disk" in text
    conf = tomllib.loads(text)
    assert conf["storage"]["graphroot"] == "/srv/containers"
    assert conf["storage"]["options"]["additionalimagestores"] == ["/srv/ro", "/c/x.store"]
    assert conf["storage"]["options"]["overlay"]["mountopt"] == "nodev"
    assert tomllib.loads(bootcfg.storage_conf("/c/x.store", text))["storage"]["options"]["additionalimagestores"] == \
        ["/srv/ro", "/c/x.store"]                    # named once however often it is added
