"""configuration.toml and containers.conf editors on real-world files: the Kata 1.x
configuration-qemu.toml as Kata installs it (bundled sample) and the full commented
containers.conf that Debian's podman 4.3.1 ships (tests/unit/data)."""

import os
import re
import shutil
import subprocess

import pytest
import tomlkit

from vfiotest.host import LocalHost
from vfiotest.kata import config, runtime

DATA = os.path.join(os.path.dirname(__file__), "data")
PODMAN_CONF = os.path.join(DATA, "containers.conf.podman-4.3.1")


@pytest.fixture
def kata_text():
    with open(config.BUNDLED_CONFIG) as f:
        return f.read()


def settings(**kw):
    return config.KataVfioSettings(kernel="/var/cache/vfiotest/k", initrd="/var/cache/vfiotest/i.img", **kw)


def comments(text):
    return [line for line in text.splitlines() if line.lstrip().startswith("#")]


def test_derived_config_has_every_setting_the_seed_needs(kata_text):
    out = config.derive_config(kata_text, settings(), source="x")
    qemu = config.read_config(out)["hypervisor"]["qemu"]
    assert qemu["machine_type"] == "q35"
    assert qemu["kernel"] == "/var/cache/vfiotest/k" and qemu["initrd"] == "/var/cache/vfiotest/i.img"
    assert "image" not in qemu                     # Kata refuses image and initrd together
    assert qemu["enable_iommu"] is True
    assert qemu["guest_hook_path"] == "/usr/share/oci/hooks"
    assert qemu["enable_debug"] is True
    params = qemu["kernel_params"].split()
    assert "systemd.unified_cgroup_hierarchy=0" in params and "agent.debug_console" in params
    # everything else is Kata's, untouched
    assert qemu["path"] == "/usr/bin/qemu-system-x86_64" and qemu["default_memory"] == 2048
    assert config.read_config(out)["proxy"]["kata"]["path"].endswith("kata-proxy")


def test_every_comment_of_the_original_survives(kata_text):
    out = config.derive_config(kata_text, settings(), source="x")
    kept = set(comments(out))
    assert all(c in kept for c in comments(kata_text))
    assert out.count("\n") >= kata_text.count("\n")


def test_deriving_twice_gives_the_same_file(kata_text):
    once = config.derive_config(kata_text, settings(), source="x")
    assert config.derive_config(once, settings(), source="x") == once


def test_kernel_params_are_merged_not_replaced():
    assert config.merge_params("quiet systemd.unified_cgroup_hierarchy=1 foo=\"a b\"",
                               ["systemd.unified_cgroup_hierarchy=0", "agent.debug_console"]) == \
        "quiet systemd.unified_cgroup_hierarchy=0 foo=a b agent.debug_console"


def test_kata2_gets_the_debug_console_in_the_agent_table(kata_text):
    out = config.read_config(config.derive_config(kata_text, settings(kata_major=2), source="x"))
    assert out["agent"]["kata"]["debug_console_enabled"] is True
    assert "agent.debug_console" not in out["hypervisor"]["qemu"]["kernel_params"]


def test_a_config_without_qemu_is_refused():
    from vfiotest.errors import ProvisionError

    with pytest.raises(ProvisionError, match=r"hypervisor\.qemu"):
        config.derive_config('[hypervisor.firecracker]\npath = "/x"\n', settings())
    with pytest.raises(ProvisionError, match="not valid TOML"):
        config.derive_config("[hypervisor.qemu\n", settings())


def test_write_config_leaves_the_source_untouched(tmp_path, kata_text):
    base = tmp_path / "installed.toml"
    base.write_text(kata_text)
    dest = tmp_path / "out" / "configuration.toml"
    written = config.write_kata_vfio_config(LocalHost(), settings(), base_path=str(base), dest=str(dest))
    assert base.read_text() == kata_text
    assert dest.read_text() == written.text and not written.bundled


# -- containers.conf ----------------------------------------------------------------------
@pytest.fixture
def podman_conf():
    with open(PODMAN_CONF) as f:
        return f.read()


def test_set_runtime_in_the_full_podman_conf_keeps_comments(podman_conf):
    out = runtime.set_runtime(podman_conf, "kata-vfio", ["/var/lib/vfiotest/kata/kata-vfio"])
    assert runtime.runtimes_of(out)["kata-vfio"] == ["/var/lib/vfiotest/kata/kata-vfio"]
    assert set(comments(podman_conf)) <= set(comments(out))
    # the entry lands in [engine.runtimes], not after whatever table happens to be last
    doc = tomlkit.parse(out).unwrap()
    assert "kata-vfio" in doc["engine"]["runtimes"] and "kata-vfio" not in doc.get("machine", {})
    # idempotent, and reversible to the byte
    assert runtime.set_runtime(out, "kata-vfio", ["/var/lib/vfiotest/kata/kata-vfio"]) == out
    assert runtime.remove_runtime(out, "kata-vfio") == podman_conf


def test_dropin_names_only_our_runtime():
    text = runtime.render_dropin("/w/kata-vfio")
    assert runtime.runtimes_of(text) == {"kata-vfio": ["/w/kata-vfio"]}
    assert runtime.MARKER in text


@pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed")
def test_podman_reads_the_dropin_and_resolves_the_runtime(tmp_path):
    """podman itself parses what we write (CONTAINERS_CONF points it at a copy: nothing in /etc changes)."""
    kata = tmp_path / "kata-runtime"           # podman asks the runtime its version: it answers as 1.x
    kata.write_text("#!/bin/sh\necho 'kata-runtime  : 1.12.1'\n")
    kata.chmod(0o755)
    wrapper = tmp_path / "kata-vfio"
    wrapper.write_text(runtime.render_wrapper(runtime.KataInstall(str(kata), "1.12.1", 1), str(tmp_path / "k.toml")))
    wrapper.chmod(0o755)
    conf = tmp_path / "containers.conf"
    conf.write_text(runtime.set_runtime(open(PODMAN_CONF).read(), "kata-vfio", [str(wrapper)]))
    p = subprocess.run(["podman", "--runtime", "kata-vfio", "info", "--format", "{{.Host.OCIRuntime.Path}}"],
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, CONTAINERS_CONF=str(conf)))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(wrapper)


@pytest.mark.parametrize("text,version,major", [
    ("kata-runtime  : 1.12.1\n   commit   : 9f3e3ef\n   OCI specs: 1.0.1-dev\n", "1.12.1", 1),
    ("kata-runtime  : 2.5.2\n   commit   : abc\n   OCI specs: 1.0.2-dev\n", "2.5.2", 2),
    ("kata-runtime  : 3.2.0\n   commit   : def\n", "3.2.0", 3),
])
def test_kata_version_detection(text, version, major):
    assert runtime.parse_kata_version(text) == version
    kata = runtime.KataInstall("/usr/bin/kata-runtime", version, major, text)
    if major == 1:
        assert "--kata-config /etc/k.toml" in runtime.render_wrapper(kata, "/etc/k.toml")
    else:
        from vfiotest.errors import ProvisionError

        assert "no OCI runtime CLI" in kata.describe()
        with pytest.raises(ProvisionError, match="shim v2 only"):
            runtime.render_wrapper(kata)


def test_no_kata_has_no_wrapper_and_says_how_to_get_a_bundle():
    from vfiotest.errors import ProvisionError

    with pytest.raises(ProvisionError) as e:
        runtime.render_wrapper(runtime.KataInstall(None, None, None))
    assert "VFIOTEST_KATA_BUNDLE" in str(e.value)


def test_registration_is_idempotent_and_puts_back_what_was_there(tmp_path):
    dropin, wrapper = tmp_path / "conf.d" / "60-k.conf", tmp_path / "state" / "kata-vfio"
    dropin.parent.mkdir()
    dropin.write_text("# someone else's\n")
    kata = runtime.KataInstall("/opt/kata/bin/kata-runtime", "1.12.1", 1)
    reg = runtime.RuntimeRegistration(LocalHost(), dropin=str(dropin), wrapper=str(wrapper), kata=kata,
                                      config_path="/etc/k.toml")
    info = reg.register()
    first = (dropin.read_text(), wrapper.read_text())
    assert (info.config, info.kata) == ("/etc/k.toml", kata) and os.access(wrapper, os.X_OK)
    assert "exec /opt/kata/bin/kata-runtime --kata-config /etc/k.toml \"$@\"" in first[1]
    reg.register()
    assert (dropin.read_text(), wrapper.read_text()) == first
    reg.unregister()
    assert dropin.read_text() == "# someone else's\n" and not wrapper.exists()


def test_guest_memory_comes_from_the_option_else_the_environment_else_the_default(monkeypatch):
    from vfiotest.kata import config as kc

    monkeypatch.delenv(kc.GUEST_MEMORY_ENV, raising=False)
    assert kc.guest_memory_mb() == kc.KATA_GUEST_MEMORY_MB == 640
    monkeypatch.setenv(kc.GUEST_MEMORY_ENV, "1024")
    assert kc.guest_memory_mb() == 1024 and kc.guest_memory_mb("512") == 512
    s = kc.KataVfioSettings.for_kata_guest(kernel="/k", initrd="/i", init=None)
    assert s.default_memory == 1024
    assert kc.KataVfioSettings.for_kata_guest(kernel="/k", initrd="/i", init=None, default_memory=640).default_memory == 640


@pytest.mark.parametrize("bad", ["abc", "64", "-1", "1.5", "512M"])
def test_a_bad_guest_memory_names_the_setting_and_the_next_step(monkeypatch, bad):
    from vfiotest.errors import ProvisionError
    from vfiotest.kata import config as kc

    monkeypatch.setenv(kc.GUEST_MEMORY_ENV, bad)
    with pytest.raises(ProvisionError, match=f"{kc.GUEST_MEMORY_ENV}='{re.escape(bad)}' is not a Kata guest memory") as e:
        kc.guest_memory_mb()
    assert "at least 128" in e.value.hint


def test_kata_config_cli_writes_the_memory_and_refuses_a_bad_one(tmp_path):
    import subprocess
    import sys

    base = tmp_path / "base.toml"
    base.write_text(open(kc_bundled()).read())
    cmd = [sys.executable, "-m", "vfiotest", "kata", "config", "--base", str(base), "--kernel", "/k", "--initrd", "/i"]
    p = subprocess.run([*cmd, "--memory", "1536"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert tomlkit.parse(p.stdout)["hypervisor"]["qemu"]["default_memory"] == 1536
    p = subprocess.run([*cmd, "--memory", "lots"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--memory" in p.stderr and "at least 128" in p.stderr, p.stderr


def kc_bundled():
    from vfiotest.kata import config as kc

    return kc.BUNDLED_CONFIG
