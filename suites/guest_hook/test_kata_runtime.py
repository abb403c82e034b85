"""The kata-vfio runtime is registered for podman in a drop-in, resolves, and is what the layer says:
the wrapper podman runs answers as Kata 1.x with the harness's configuration."""

import json

from vfiotest.fixtures.allure_report import attach_json, attach_text
from vfiotest.kata import runtime


def test_podman_resolves_kata_vfio_to_the_wrapper(target_host, kata_runtime):
    res = target_host.run(["podman", "--runtime", "kata-vfio", "info", "--format",
                           "{{.Host.OCIRuntime.Name}} {{.Host.OCIRuntime.Path}}"], timeout=60)
    attach_text("podman --runtime kata-vfio info: runtime name and path", res.stdout + res.stderr)
    assert res.ok, res.stderr
    assert res.stdout.split() == ["kata-vfio", kata_runtime.wrapper]


def test_registration_is_a_dropin_not_the_distro_file(target_host, kata_runtime):
    assert kata_runtime.dropin.startswith("/etc/containers/containers.conf.d/")
    text = target_host.read_text(kata_runtime.dropin)
    attach_text(f"the drop-in {kata_runtime.dropin}", text)
    assert runtime.runtimes_of(text) == {"kata-vfio": [kata_runtime.wrapper]}
    distro = "/usr/share/containers/containers.conf"
    if target_host.exists(distro):
        assert "kata-vfio" not in target_host.read_text(distro)


def _resolved_wrapper(target_host):
    """The path podman runs for the runtime name kata-vfio (`podman --runtime kata-vfio info`)."""
    res = target_host.run(["podman", "--runtime", "kata-vfio", "info", "--format", "{{.Host.OCIRuntime.Path}}"],
                          timeout=60)
    assert res.ok, res.stderr
    return res.stdout.strip()


def _real(target_host, path):
    res = target_host.run(["readlink", "-f", "--", path], timeout=30)
    assert res.ok, res.stderr
    return res.stdout.strip()


def test_the_wrapper_podman_runs_is_kata_1x_with_our_configuration(target_host, kata_runtime, guest_image):
    """Run what podman resolves kata-vfio to: `kata-env` answers from Kata 1.x's kata-runtime,
    reading OUR configuration.toml (--kata-config), which boots our guest image."""
    wrapper = _resolved_wrapper(target_host)
    res = target_host.run([wrapper, "kata-env", "--json"], timeout=120)
    assert res.ok, f"{wrapper} kata-env failed (exit {res.rc}):\n{res.stdout}{res.stderr}"
    env = json.loads(res.stdout)
    attach_json(f"{wrapper} kata-env --json", env)
    rt = env["Runtime"]
    assert rt["Config"]["Path"] == kata_runtime.config, rt["Config"]
    assert rt["Version"]["Version"]["Major"] == 1 and rt["Version"]["Version"]["Semver"] == kata_runtime.kata.version
    assert _real(target_host, rt["Path"]) == _real(target_host, kata_runtime.kata.path), rt["Path"]
    assert _real(target_host, env["Initrd"]["Path"]) == _real(target_host, guest_image.target_path), env["Initrd"]
