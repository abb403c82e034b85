"""vfiotest.wire: the marker-frame exchange script, run for real on this machine's loopback."""

from __future__ import annotations

import os
import socket

import pytest

from vfiotest import wire
from vfiotest.errors import TargetError
from vfiotest.host import LocalHost


def _raw_sockets() -> bool:
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close()
        return True
    except (OSError, AttributeError):
        return False


needs_raw = pytest.mark.skipif(os.geteuid() != 0 or not _raw_sockets(),
                               reason="raw AF_PACKET sockets need root on Linux: cannot exist here")


@needs_raw
def test_frames_sent_on_loopback_are_counted_in_order() -> None:
    ex = wire.exchange(LocalHost(), "lo", "02:00:00:00:00:10", "lo", 200, tag="t1", window=10)
    assert (ex.sent, ex.received, ex.lost, ex.duplicates, ex.in_order) == (200, 200, 0, 0, True)
    assert ex.tx_packets >= 200 and ex.rx_packets >= 200


@needs_raw
def test_frames_of_another_tag_are_not_counted() -> None:
    """Only this exchange's frames count: zero frames sent, zero counted, even with other traffic."""
    ex = wire.exchange(LocalHost(), "lo", "02:00:00:00:00:10", "lo", 0, tag="t2", window=0.5)
    assert (ex.sent, ex.received) == (0, 0)


@needs_raw
def test_unknown_interface_is_a_target_error_naming_it() -> None:
    with pytest.raises(TargetError, match="no network interface 'nosuch0'"):
        wire.exchange(LocalHost(), "lo", "02:00:00:00:00:10", "nosuch0", 1, window=0.5)


def test_loopback_found_by_its_mac() -> None:
    assert wire.interface_by_mac(LocalHost(), "00:00:00:00:00:00") == "lo"


@pytest.mark.parametrize("args", [("lo", "02:00:00:00:00:1", "lo"), ("lo; reboot", "02:00:00:00:00:10", "lo"),
                                  ("lo", "02:00:00:00:00:10", "$(x)")])
def test_what_reaches_the_target_is_validated(args: tuple[str, str, str]) -> None:
    with pytest.raises(TargetError):
        wire.exchange(LocalHost(), args[0], args[1], args[2], 1)


@needs_raw
def test_paced_frames_come_with_one_round_trip_time_each() -> None:
    ex = wire.exchange(LocalHost(), "lo", "02:00:00:00:00:10", "lo", 20, tag="t5", window=5, gap=0.01)
    assert ex.received == 20 and len(ex.rtt_ms) == 20
    assert list(ex.rtt_ms) == sorted(ex.rtt_ms) and ex.rtt_ms[0] >= 0
    assert ex.span_s >= 19 * 0.01          # the frames were sent `gap` apart


def test_a_negative_gap_is_refused() -> None:
    with pytest.raises(TargetError, match="bad gap"):
        wire.exchange(LocalHost(), "lo", "02:00:00:00:00:10", "lo", 1, gap=-1)
