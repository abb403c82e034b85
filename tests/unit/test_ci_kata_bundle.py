"""ci/kata-bundle, how a fleet job without ../shared/kata gets the Kata 1.x bundle: the tarball
already at $VFIOTEST_KATA_BUNDLE (the pipeline's cache) with the pinned sha256 is kept; else it
is fetched from $KATA_BUNDLE_URL (here a file:// URL: curl, no network) and checked; neither, or
a wrong sha256, fails saying how to provide one."""

import hashlib
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "ci", "kata-bundle")

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (ci/setup installs it)")


def run(dest, sha, url=None):
    env = {"PATH": os.environ["PATH"], "VFIOTEST_KATA_BUNDLE": str(dest), "KATA_BUNDLE_SHA256": sha}
    if url:
        env["KATA_BUNDLE_URL"] = url
    return subprocess.run([SCRIPT], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def kept(tmp_path):
    """A tarball where the project keeps it, and its sha256."""
    src = tmp_path / "store" / "kata-1.12.1-x86_64.tar.zst"
    src.parent.mkdir()
    src.write_bytes(b"not really a bundle, but bytes with a digest\n")
    return src, hashlib.sha256(src.read_bytes()).hexdigest()


def test_fetched_checked_then_taken_from_the_cache(tmp_path, kept):
    src, sha = kept
    dest = tmp_path / "cache" / "kata.tar.zst"
    p = run(dest, sha, f"file://{src}")
    assert p.returncode == 0 and dest.read_bytes() == src.read_bytes(), p.stderr
    assert "(fetched)" in p.stderr
    src.unlink()                               # the cache alone is enough now
    p = run(dest, sha)
    assert p.returncode == 0 and "from the pipeline's cache" in p.stderr, p.stderr


def test_no_cache_and_no_url_fails_saying_how_to_provide_one(tmp_path, kept):
    _, sha = kept
    p = run(tmp_path / "cache" / "kata.tar.zst", sha)
    assert p.returncode == 1
    assert "KATA_BUNDLE_URL is not set" in p.stderr and "../shared/kata/build.sh" in p.stderr, p.stderr


def test_a_tarball_with_another_sha256_is_refused(tmp_path, kept):
    src, sha = kept
    dest = tmp_path / "cache" / "kata.tar.zst"
    wrong = ("0" if sha[0] != "0" else "1") + sha[1:]
    p = run(dest, wrong, f"file://{src}")
    assert p.returncode == 1 and "refusing it" in p.stderr, p.stderr
    assert not dest.exists() and os.listdir(dest.parent) == []      # nothing half-fetched left behind


def test_a_bad_sha256_setting_is_a_usage_error(tmp_path):
    p = run(tmp_path / "k.tar.zst", "abc")
    assert p.returncode == 2 and "not a sha256" in p.stderr, p.stderr
