"""The Kata 1.x bundle as an asset: unpack + verify + reuse, damage and traversal refused,
where it comes from, choose_kata's order, the copy to a target (a LocalHost into a tmp
dir), and the real shared tarball when this machine has it."""

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile

import pytest

from vfiotest import command
from vfiotest.errors import ProvisionError
from vfiotest.host import LocalHost
from vfiotest.kata import bundle

REAL = "/work/shared/kata/kata-1.12.1-x86_64.tar.zst"
FILES = {
    "bin/kata-agent": b"\x7fELF fake agent\n" * 100,
    "libexec/kata-containers/kata-shim": b"fake shim\n",
    "libexec/kata-containers/kata-proxy": b"fake proxy\n" * 3000,
    "share/defaults/kata-containers/configuration-qemu.toml": b"[hypervisor.qemu]\npath = \"/usr/bin/qemu\"\n",
}


def runtime_script(version):
    return (f"#!/bin/sh\nif [ \"$1\" = --version ]; then\n  echo 'kata-runtime  : {version}'\n"
            f"  echo '   commit   : <<unknown>>'\n  echo '   OCI specs: 1.0.1-dev'\n  exit 0\nfi\nexit 1\n").encode()


def sha(data):
    return hashlib.sha256(data).hexdigest()


def make_tree(parent, version="1.12.1", top="kata-1.12.1", extra_sums=(), after=None):
    """A fake bundle directory parent/top with SHA256SUMS; `after(root)` changes it afterwards."""
    root = os.path.join(parent, top)
    files = dict(FILES, **{"bin/kata-runtime": runtime_script(version)})
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o755 if rel.startswith(("bin/", "libexec/")) else 0o644)
    lines = [f"{sha(data)}  {rel}\n" for rel, data in sorted(files.items())] + list(extra_sums)
    with open(os.path.join(root, "SHA256SUMS"), "w") as f:
        f.writelines(lines)
    if after:
        after(root)
    return root


def pack(parent, out, top="kata-1.12.1"):
    tar = out + ".tar"
    subprocess.run(["tar", "-C", parent, "-cf", tar, top], check=True)
    subprocess.run(["zstd", "-q", "--rm", "-o", out, tar], check=True)
    return out


def fake_tarball(tmp_path, name="b", **kw):
    src = tmp_path / f"src-{name}"
    src.mkdir()
    make_tree(str(src), **kw)
    return pack(str(src), str(tmp_path / f"{name}.tar.zst"))


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Nothing reaches /var/cache/vfiotest, /var/lib/vfiotest or the shared bundle."""
    monkeypatch.setenv("VFIOTEST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(bundle.BUNDLE_ENV, raising=False)
    monkeypatch.setattr(bundle, "DEFAULT_BUNDLE", str(tmp_path / "no-shared" / bundle.BUNDLE_NAME))
    monkeypatch.setattr(bundle, "REMOTE_DIR", str(tmp_path / "remote"))


@pytest.fixture
def extracts(monkeypatch):
    """Counts real extractions."""
    calls = []
    real = bundle._extract

    def counting(source, dest):
        calls.append(source)
        return real(source, dest)

    monkeypatch.setattr(bundle, "_extract", counting)
    return calls


def test_unpack_verifies_and_second_call_reuses(tmp_path, extracts):
    tb = fake_tarball(tmp_path)
    with open(tb, "rb") as f:
        want_sha = sha(f.read())
    b = bundle.unpack_bundle(tb)
    assert b.sha256 == want_sha and b.version == "1.12.1" and b.major == 1 and b.source == tb
    assert b.root == str(tmp_path / "cache" / "kata" / want_sha[:16] / "kata-1.12.1")
    assert b.runtime == os.path.join(b.root, "bin/kata-runtime") and os.access(b.runtime, os.X_OK)
    assert b.proxy.endswith("libexec/kata-containers/kata-proxy") and os.path.isfile(b.config)
    with open(b.shim, "rb") as f:
        assert f.read() == FILES["libexec/kata-containers/kata-shim"]
    with open(os.path.join(os.path.dirname(b.root), ".verified")) as f:
        stamp = json.load(f)
    assert stamp["tarball_sha256"] == want_sha and stamp["sizes"]["libexec/kata-containers/kata-proxy"] == 33000
    assert b.describe() == (f"Kata 1.12.1 bundle {tb} (sha256 {want_sha[:12]}…), unpacked at {b.root}")
    assert sorted(os.listdir(tmp_path / "cache" / "kata")) == [want_sha[:16], want_sha[:16] + ".lock"]
    assert stat.S_IMODE(os.stat(os.path.dirname(b.root)).st_mode) == 0o755   # readable by the runner over 9p
    mtime = os.stat(b.root).st_mtime_ns
    again = bundle.unpack_bundle(tb)
    assert extracts == [tb]                      # unpacked once
    assert again == b and os.stat(b.root).st_mtime_ns == mtime


def test_damaged_cached_unpack_is_unpacked_again(tmp_path, extracts):
    tb = fake_tarball(tmp_path)
    b = bundle.unpack_bundle(tb)
    sha16 = os.path.basename(os.path.dirname(b.root))
    leftover = tmp_path / "cache" / "kata" / f".{sha16}.killed.partial"    # a process killed mid-unpack
    (leftover / "kata-1.12.1").mkdir(parents=True)
    with open(b.proxy, "ab") as f:
        f.write(b"tampered")
    said = []
    b2 = bundle.unpack_bundle(tb, progress=said.append)
    assert len(extracts) == 2 and any("unpacking again" in s for s in said)
    assert not leftover.exists()
    with open(b2.proxy, "rb") as f:
        assert f.read() == FILES["libexec/kata-containers/kata-proxy"]


def test_corrupted_file_is_refused_naming_it_and_both_hashes(tmp_path):
    def corrupt(root):
        with open(os.path.join(root, "bin/kata-agent"), "wb") as f:
            f.write(b"not the agent")
        os.chmod(os.path.join(root, "bin/kata-agent"), 0o755)

    tb = fake_tarball(tmp_path, after=corrupt)
    with pytest.raises(ProvisionError) as e:
        bundle.unpack_bundle(tb)
    msg = str(e.value)
    assert "bin/kata-agent" in msg and sha(b"not the agent") in msg and sha(FILES["bin/kata-agent"]) in msg
    assert "build.sh" in e.value.hint
    # the bad unpack is gone, nothing half-made is left
    assert [n for n in os.listdir(tmp_path / "cache" / "kata") if not n.endswith(".lock")] == []


def test_file_listed_but_missing_is_refused(tmp_path):
    tb = fake_tarball(tmp_path, extra_sums=[f"{'ab' * 32}  bin/kata-netmon\n"])
    with pytest.raises(ProvisionError, match=r"bin/kata-netmon is listed in SHA256SUMS but missing"):
        bundle.unpack_bundle(tb)


def test_binary_that_is_not_executable_is_refused(tmp_path):
    tb = fake_tarball(tmp_path, after=lambda root: os.chmod(os.path.join(root, "libexec/kata-containers/kata-shim"), 0o644))
    with pytest.raises(ProvisionError, match=r"kata-shim in the Kata bundle .* is not executable"):
        bundle.unpack_bundle(tb)


def _zst_with_members(tmp_path, names):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 4
            tf.addfile(info, io.BytesIO(b"evil"))
    raw = tmp_path / "evil.tar"
    raw.write_bytes(buf.getvalue())
    out = str(tmp_path / "evil.tar.zst")
    subprocess.run(["zstd", "-q", "-f", "-o", out, str(raw)], check=True)
    return out


@pytest.mark.parametrize("member", ["kata-1.12.1/../../escaped", "/tmp/vfiotest-escaped-abs"])
def test_path_traversal_member_is_refused(tmp_path, member):
    tb = _zst_with_members(tmp_path, ["kata-1.12.1/SHA256SUMS", member])
    with pytest.raises(ProvisionError, match="absolute path or `..`.*refused"):
        bundle.unpack_bundle(tb)
    assert not os.path.exists(tmp_path / "cache" / "escaped") and not os.path.exists(tmp_path / "escaped")
    assert not os.path.exists("/tmp/vfiotest-escaped-abs")
    assert [n for n in os.listdir(tmp_path / "cache" / "kata") if not n.endswith(".lock")] == []


def test_two_top_directories_are_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_tree(str(src))
    (src / "other").mkdir()
    tar = str(tmp_path / "two.tar")
    subprocess.run(["tar", "-C", str(src), "-cf", tar, "kata-1.12.1", "other"], check=True)
    with pytest.raises(ProvisionError, match="exactly one top directory with SHA256SUMS"):
        bundle.unpack_bundle(tar)


def test_parallel_unpacks_unpack_once(tmp_path):
    tb = fake_tarball(tmp_path)
    code = ("import sys; from vfiotest.kata import bundle; "
            "b = bundle.unpack_bundle(sys.argv[1], progress=lambda m: print('SAID', m)); print('ROOT', b.root)")
    procs = [subprocess.Popen([sys.executable, "-c", code, tb], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert sum(o.count("SAID unpacking") for o in outs) == 1
    assert len({line for o in outs for line in o.splitlines() if line.startswith("ROOT")}) == 1


def test_source_env_wins_default_next_and_a_missing_env_path_is_an_error(tmp_path, monkeypatch):
    assert bundle.bundle_source() == (None, None) and bundle.find_bundle() is None
    default = tmp_path / "shared" / "kata" / bundle.BUNDLE_NAME
    default.parent.mkdir(parents=True)
    default.write_bytes(b"x")
    monkeypatch.setattr(bundle, "DEFAULT_BUNDLE", str(default))
    assert bundle.default_bundle_path() == str(default)
    assert bundle.bundle_source() == (str(default), "default")
    env_dir = tmp_path / "mine"
    env_dir.mkdir()
    monkeypatch.setenv(bundle.BUNDLE_ENV, str(env_dir))
    assert bundle.bundle_source() == (str(env_dir), "env")
    monkeypatch.setenv(bundle.BUNDLE_ENV, str(tmp_path / "nothing-here.tar.zst"))
    with pytest.raises(ProvisionError, match=r"VFIOTEST_KATA_BUNDLE=.*nothing-here\.tar\.zst names nothing"):
        bundle.bundle_source()
    with pytest.raises(ProvisionError):
        bundle.find_bundle()


def test_default_path_is_shared_beside_the_checkout():
    import vfiotest

    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(vfiotest.__file__))))
    assert bundle.REPO_ROOT == checkout
    assert os.path.isfile(os.path.join(checkout, "pyproject.toml"))


def test_directory_source_is_verified_in_place(tmp_path):
    src = tmp_path / "dir"
    src.mkdir()
    root = make_tree(str(src))
    with open(os.path.join(root, "SHA256SUMS"), "rb") as f:
        sums_sha = sha(f.read())
    for given in (root, str(src)):            # the kata-1.12.1 dir, or its parent
        b = bundle.unpack_bundle(given)
        assert b.root == root and b.sha256 == sums_sha and b.version == "1.12.1" and b.source == given
    assert not os.path.exists(tmp_path / "cache")          # no copy
    with open(os.path.join(root, "share/defaults/kata-containers/configuration-qemu.toml"), "a") as f:
        f.write("# edited\n")
    with pytest.raises(ProvisionError, match="configuration-qemu.toml in the Kata bundle .* is damaged"):
        bundle.unpack_bundle(root)


def test_not_a_bundle_file_is_refused(tmp_path):
    p = tmp_path / "kata.zip"
    p.write_bytes(b"PK")
    with pytest.raises(ProvisionError, match="neither a directory nor"):
        bundle.unpack_bundle(str(p))
    broken = tmp_path / "broken.tar.zst"
    broken.write_bytes(b"\x28\xb5\x2f\xfd garbage")
    with pytest.raises(ProvisionError, match="zstd could not decompress|not a readable tarball"):
        bundle.unpack_bundle(str(broken))


# -- copy_bundle_to, through a LocalHost into a tmp dir ----------------------------------

class CountingHost(LocalHost):
    def __init__(self):
        super().__init__("counting")
        self.writes = 0

    def run(self, cmd, **kw):
        if isinstance(cmd, list) and cmd[:2] == ["sh", "-c"] and cmd[2].startswith("cat >"):
            self.writes += 1
        return super().run(cmd, **kw)


def test_copy_bundle_to_copies_checks_and_skips_when_present(tmp_path, monkeypatch):
    monkeypatch.setattr(bundle, "COPY_CHUNK", 4096)      # several chunks for the proxy (33000 bytes)
    b = bundle.unpack_bundle(fake_tarball(tmp_path))
    host = CountingHost()
    dest = str(tmp_path / "target" / "bundle-x")
    assert bundle.copy_bundle_to(host, b, dest) == dest
    for rel, data in dict(FILES, **{"bin/kata-runtime": runtime_script("1.12.1")}).items():
        with open(os.path.join(dest, rel), "rb") as f:
            assert f.read() == data, rel
        executable = bool(os.stat(os.path.join(dest, rel)).st_mode & stat.S_IXUSR)
        assert executable == rel.startswith(("bin/", "libexec/")), rel
    with open(os.path.join(dest, "SHA256SUMS"), "rb") as f, open(os.path.join(b.root, "SHA256SUMS"), "rb") as g:
        assert f.read() == g.read()
    assert host.writes == 6 + 33000 // 4096           # 6 files, the proxy in 9 chunks
    assert not os.path.exists(dest + ".partial")
    host.writes = 0
    assert bundle.copy_bundle_to(host, b, dest) == dest and host.writes == 0   # already there
    with open(os.path.join(dest, "bin/kata-agent"), "r+b") as f:
        f.write(b"XX")
    bundle.copy_bundle_to(host, b, dest)
    assert host.writes > 0
    with open(os.path.join(dest, "bin/kata-agent"), "rb") as f:
        assert f.read() == FILES["bin/kata-agent"]


def test_copy_bundle_to_default_dest_and_bad_dest(tmp_path):
    b = bundle.unpack_bundle(fake_tarball(tmp_path))
    dest = bundle.copy_bundle_to(LocalHost(), b)
    assert dest == str(tmp_path / "remote" / f"bundle-{b.sha256[:16]}")
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=dest).returncode == 0
    for bad in ("relative/dir", "/", "/tmp/../etc/x"):
        with pytest.raises(ProvisionError, match="refusing"):
            bundle.copy_bundle_to(LocalHost(), b, bad)


# -- choose_kata ------------------------------------------------------------------------

@pytest.fixture
def installed(tmp_path, monkeypatch):
    """install(version): a kata-runtime of that version on the PATH LocalHost's commands see."""
    fakebin = tmp_path / "fakebin"
    fakebin.mkdir()
    monkeypatch.setenv("PATH", f"{fakebin}:/usr/sbin:/usr/bin:/sbin:/bin")

    def install(version):
        p = fakebin / "kata-runtime"
        p.write_bytes(runtime_script(version))
        p.chmod(0o755)
        return str(p)

    return install


@pytest.fixture
def default_bundle(tmp_path, monkeypatch):
    tb = fake_tarball(tmp_path, name="shared")
    monkeypatch.setattr(bundle, "DEFAULT_BUNDLE", tb)
    return tb


def test_choose_installed_1x_over_the_default_bundle(installed, default_bundle):
    path = installed("1.12.1")
    c = bundle.choose_kata(LocalHost(), shares_controller_fs=True)
    assert (c.kind, c.version, c.runtime_path, c.bundle) == ("installed", "1.12.1", path, None)
    assert c.supported and not c.refused and c.source == f"installed ({path})"


def test_choose_default_bundle_when_only_2x_is_installed(installed, default_bundle):
    installed("2.0.0")
    c = bundle.choose_kata(LocalHost(), shares_controller_fs=True)
    assert (c.kind, c.version, c.how, c.installed.version) == ("bundle", "1.12.1", "default", "2.0.0")
    assert c.runtime_path == c.bundle.runtime and c.bundle.source == default_bundle
    assert c.supported and not c.refused and "no OCI runtime CLI" in c.reason


def test_env_bundle_wins_over_an_installed_1x(tmp_path, installed, default_bundle, monkeypatch):
    installed("1.12.1")
    env_tb = fake_tarball(tmp_path, name="env")
    monkeypatch.setenv(bundle.BUNDLE_ENV, env_tb)
    c = bundle.choose_kata(LocalHost(), shares_controller_fs=True)
    assert (c.kind, c.how, c.bundle.source) == ("bundle", "env", env_tb)
    assert c.source == f"VFIOTEST_KATA_BUNDLE={env_tb}" and c.installed.version == "1.12.1"


def test_only_2x_and_no_bundle_is_refused(installed):
    path = installed("3.2.0")
    c = bundle.choose_kata(LocalHost())
    assert (c.kind, c.version, c.runtime_path) == ("none", "3.2.0", path)
    assert c.refused and not c.supported and "Kata 3.2.0 has no OCI runtime CLI" in c.reason


def test_nothing_installed_and_no_bundle(installed):
    c = bundle.choose_kata(LocalHost())
    assert (c.kind, c.version, c.runtime_path, c.installed.installed) == ("none", None, None, False)
    assert not c.refused and not c.supported and "not installed" in c.reason


def test_a_2x_bundle_is_refused(tmp_path, installed, monkeypatch):
    monkeypatch.setenv(bundle.BUNDLE_ENV, fake_tarball(tmp_path, version="2.0.0"))
    with pytest.raises(ProvisionError, match="is Kata 2.0.0, not 1.x"):
        bundle.choose_kata(LocalHost(), shares_controller_fs=True)


def test_a_target_not_sharing_the_controller_fs_gets_a_copy(tmp_path, installed, default_bundle):
    c = bundle.choose_kata(LocalHost())
    remote = str(tmp_path / "remote" / f"bundle-{c.bundle.sha256[:16]}")
    assert c.target_root == remote and c.runtime_path == remote + "/bin/kata-runtime"
    out = subprocess.run([c.runtime_path, "--version"], capture_output=True, text=True).stdout
    assert "kata-runtime  : 1.12.1" in out


# -- the CLI ----------------------------------------------------------------------------

def test_cli_detect_json_and_refusal_exit(tmp_path, installed, default_bundle, monkeypatch, capsys):
    assert command.main(["kata", "detect", "--target", "local", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["kind"], got["version"], got["how"], got["supported"]) == ("bundle", "1.12.1", "default", True)
    assert got["runtime_path"].endswith("/kata-1.12.1/bin/kata-runtime") and len(got["sha256"]) == 64
    monkeypatch.setattr(bundle, "DEFAULT_BUNDLE", str(tmp_path / "gone.tar.zst"))
    installed("2.1.0")
    assert command.main(["kata", "detect", "--target", "local"]) == 1
    out = capsys.readouterr().out
    assert "kind:      none" in out and "supported: no: Kata 2.1.0 has no OCI runtime CLI" in out
    monkeypatch.setenv(bundle.BUNDLE_ENV, str(tmp_path / "missing"))
    assert command.main(["kata", "detect", "--target", "local"]) == 2
    assert "names nothing" in capsys.readouterr().err


# -- the real bundle ----------------------------------------------------------------------

def test_the_real_shared_bundle_unpacks_and_verifies(tmp_path, extracts):
    if not os.path.isfile(REAL):
        pytest.skip(f"{REAL} is not on this machine")
    b = bundle.unpack_bundle(REAL, cache_dir=str(tmp_path / "c"))
    assert b.version == "1.12.1" and os.path.basename(b.root) == "kata-1.12.1"
    assert b.sha256 == bundle.sha256_file(REAL)
    assert sorted(rel for rel, _ in b.entries()) == sorted(bundle.REQUIRED.values())
    again = bundle.unpack_bundle(REAL, cache_dir=str(tmp_path / "c"))
    assert again.root == b.root and extracts == [REAL]


def test_guest_image_and_kernel_are_staged_on_a_target_that_does_not_share_files(tmp_path):
    """An ssh:// runner does not read this machine's files: the image and kernel are copied
    under content-named paths, checked, and a second staging sends nothing."""
    from vfiotest.host import LocalHost
    from vfiotest.kata import initrd

    img, kernel = tmp_path / "initrd-abc.img", tmp_path / "vmlinuz-6.1"
    img.write_bytes(os.urandom(3 * bundle.COPY_CHUNK + 17))
    kernel.write_bytes(b"kernel" * 1000)
    built = initrd.BuiltInitrd(path=str(img), key="abc", kernel=str(kernel), kver="6.1", size=img.stat().st_size,
                               build_seconds=0.0, cached=True)
    target = tmp_path / "target" / "kata"
    initrd.stage_on_target(LocalHost(), built, target_dir=str(target))
    assert built.target_path.startswith(str(target)) and built.target_path.endswith("-initrd-abc.img")
    assert open(built.target_path, "rb").read() == img.read_bytes()
    assert open(built.target_kernel, "rb").read() == kernel.read_bytes()
    said = []
    initrd.stage_on_target(LocalHost(), built, progress=said.append, target_dir=str(target))
    assert said == []                                  # already there: nothing copied
    assert sorted(os.listdir(target)) == sorted(os.path.basename(p) for p in (built.target_path, built.target_kernel))
