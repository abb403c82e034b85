"""Property tests (hypothesis) on what turns user input into something that reaches a shell or
sysfs: every input is either refused with the harness's own error or comes out in a form that
carries no shell syntax, and quoted commands reach the shell word for word."""

import argparse
import re
import shlex
import subprocess

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfiotest.errors import HarnessError
from vfiotest.fixtures import _vf_count
from vfiotest.host import command_text
from vfiotest.kernelargs import add_to_grub_default, validate_args
from vfiotest.pci import PciAddress
from vfiotest.sshhost import parse_ssh_target

CANONICAL = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
SAFE_HOST = re.compile(r"^[A-Za-z0-9.:_-]+$")
SAFE_USER = re.compile(r"^[A-Za-z0-9._-]+$")
many = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@many
@given(st.text(max_size=40))
def test_any_text_is_a_canonical_pci_address_or_refused(text):
    try:
        a = PciAddress(text)
    except HarnessError:
        return
    assert CANONICAL.match(a), a
    assert PciAddress(a) == a


@many
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFF), st.integers(0, 31), st.integers(0, 7), st.booleans(),
       st.booleans())
def test_every_well_formed_address_is_taken_in_lower_case(dom, bus, dev, fn, upper, short):
    text = (f"{bus:02x}:{dev:02x}.{fn}" if short else f"{dom:04x}:{bus:02x}:{dev:02x}.{fn}")
    a = PciAddress(text.upper() if upper else text)
    assert a == (f"0000:{bus:02x}:{dev:02x}.{fn}" if short else f"{dom:04x}:{bus:02x}:{dev:02x}.{fn}")


@many
@given(st.integers(32, 0xFF))
def test_a_device_number_over_31_is_refused(dev):
    try:
        PciAddress(f"0000:01:{dev:02x}.0")
    except HarnessError as e:
        assert "not a PCI address" in str(e)
    else:
        raise AssertionError(f"device {dev:#x} accepted")


@many
@given(st.one_of(st.text(max_size=60), st.builds(lambda s: "ssh://" + s, st.text(max_size=50))))
def test_any_ssh_target_is_parsed_into_shell_free_words_or_refused(text):
    try:
        user, host, port = parse_ssh_target(text)
    except HarnessError:
        return
    assert SAFE_USER.match(user) and SAFE_HOST.match(host), (user, host)
    assert 0 < port < 65536


@many
@given(st.lists(st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=20),
                max_size=6))
def test_quoted_commands_reach_the_shell_word_for_word(words):
    out = subprocess.run(["/bin/sh", "-c", command_text(["printf", "%s\\0", *words])],
                         capture_output=True, timeout=10).stdout
    assert out == b"".join(w.encode() + b"\0" for w in words) or (not words and out == b"\0")


@many
@given(st.text(max_size=12))
def test_any_vf_count_is_a_whole_number_or_a_usage_error(text):
    try:
        n = _vf_count(text)
    except argparse.ArgumentTypeError as e:
        assert repr(text) in str(e) or "negative" in str(e)
        return
    assert isinstance(n, int) and n >= 0


@many
@given(st.lists(st.text(max_size=20), min_size=1, max_size=4), st.text(max_size=200))
def test_kernel_arguments_are_plain_words_or_refused_and_land_once(args, grub):
    try:
        validate_args(args)
    except HarnessError:
        return
    for a in args:
        assert shlex.split(a) == [a], a       # nothing the shell or GRUB's quoting would change
    if "\x00" in grub or "\r" in grub:
        return
    out = add_to_grub_default(grub, args)
    line = [ln for ln in out.splitlines() if ln.startswith("GRUB_CMDLINE_LINUX=")][-1]
    words = shlex.split(line.split("=", 1)[1])[0].split()
    for a in args:
        assert a in words
    names = [w.split("=", 1)[0] for w in words]
    for a in set(args):
        assert names.count(a.split("=", 1)[0]) >= 1
