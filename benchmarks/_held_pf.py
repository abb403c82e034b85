"""What the VF I/O benchmarks share: a PF whose VF count they hold, and a journal of what they
change, put back and let go at the end (`vfiotest restore` after a kill)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

from vfiotest import sriov
from vfiotest.journal import Journal
from vfiotest.lease import LeasePool


@contextlib.contextmanager
def held_pf(host: Any, pf: str, who: str, before_restore: Optional[Callable[[], None]] = None) -> Iterator[Journal]:
    """The PF's VF count and its VFs' groups held as `who` (sriov.hold_vfs) with an open journal;
    SystemExit(1) with a word when another user holds them."""
    held = sriov.hold_vfs(host, LeasePool(host), pf, test_id=who)
    if held is None:
        print(f"{pf}: its VF count is held by another user; try again later")
        raise SystemExit(1)
    with Journal.open(host) as journal:
        try:
            yield journal
        finally:
            try:
                if before_restore is not None:
                    before_restore()
            finally:
                journal.restore_all()
                for lease in held:
                    lease.release()
