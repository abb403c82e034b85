"""A write on the local target that blocks (a sysfs attribute whose driver hangs; here a FIFO
nobody reads) is given up after its timeout with an error naming the file, not waited for forever."""

import os
import time

import pytest

from vfiotest.errors import CommandTimeout
from vfiotest.host import LocalHost


def test_a_blocking_write_times_out_naming_the_file(tmp_path):
    fifo = tmp_path / "stuck"
    os.mkfifo(fifo)
    host = LocalHost()
    t0 = time.monotonic()
    with pytest.raises(CommandTimeout) as e:
        host.write_text(str(fifo), "1", timeout=1)
    assert time.monotonic() - t0 < 5
    assert str(fifo) in str(e.value) and "did not finish in 1 s" in str(e.value) and e.value.hint
    os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)      # let the abandoned writer go


def test_writes_that_do_not_block_still_work_and_raise_their_own_errors(tmp_path):
    host = LocalHost()
    (tmp_path / "f").write_text("")
    host.write_text(str(tmp_path / "f"), "x", timeout=5)      # one write(2) to an existing file
    assert (tmp_path / "f").read_text() == "x"
    host.write_atomic(str(tmp_path / "g"), "y", timeout=5)
    assert (tmp_path / "g").read_text() == "y"
    with pytest.raises(OSError):
        host.write_text(str(tmp_path / "no" / "such" / "f"), "x", timeout=5)
