"""The kata-vfio runtime is registered for podman in a drop-in, resolves, and is what the layer says."""

from vfiotest.kata import runtime


def test_podman_resolves_kata_vfio_to_the_wrapper(target_host, kata_runtime):
    res = target_host.run(["podman", "--runtime", "kata-vfio", "info", "--format",
                           "{{.Host.OCIRuntime.Name}} {{.Host.OCIRuntime.Path}}"], timeout=60)
    assert res.ok, res.stderr
    assert res.stdout.split() == ["kata-vfio", kata_runtime.wrapper]


def test_registration_is_a_dropin_not_the_distro_file(target_host, kata_runtime):
    assert kata_runtime.dropin.startswith("/etc/containers/containers.conf.d/")
    text = target_host.read_text(kata_runtime.dropin)
    assert runtime.runtimes_of(text) == {"kata-vfio": [kata_runtime.wrapper]}
    distro = "/usr/share/containers/containers.conf"
    if target_host.exists(distro):
        assert "kata-vfio" not in target_host.read_text(distro)


def test_wrapper_matches_what_is_installed(target_host, kata_runtime):
    text = target_host.read_text(kata_runtime.wrapper)
    if kata_runtime.standin:
        assert "exec /usr/bin/runc" in text          # no Kata here: runc + the nested guest
    else:
        assert "--kata-config" in text and kata_runtime.kata.major == 1
