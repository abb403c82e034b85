"""How ci/test spreads the harness's own tests over two workers (`-n 2 --dist loadgroup
--no-loadscope-reorder`): each VM test boots a runner of its own and keeps one core busy, so the
longest start first and the short ones fill in behind them (longest-first list scheduling).

`@pytest.mark.duration(seconds)` says about how long a test, or a module's tests together when
the module is one `xdist_group` (a runner shared by its tests), take here serially; the figures
are in docs/measurements.md. A test without one is short and runs last, in the order collected."""

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "duration(seconds): about how long this test, or its xdist_group "
                                       "together, takes here serially; under -n the longest start first")


def _group(item: pytest.Item) -> str:
    m = item.get_closest_marker("xdist_group")
    if m is not None:
        return str(m.args[0] if m.args else m.kwargs.get("name"))
    return item.nodeid


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cost: dict[str, float] = {}
    for item in items:
        m = item.get_closest_marker("duration")
        if m is not None:
            cost[_group(item)] = max(cost.get(_group(item), 0.0), float(m.args[0]))
    # stable: a group's tests stay together and in their order; the unmarked keep theirs
    items.sort(key=lambda item: -cost.get(_group(item), 0.0))
