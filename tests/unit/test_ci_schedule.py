"""ci/test's order under -n (tests/conftest.py): the longest VM work first, a shared runner's
tests (one xdist_group) together and in their order, the short tests after in collection order."""

import importlib.util
import os

import pytest

_spec = importlib.util.spec_from_file_location(
    "tests_conftest", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conftest.py"))
assert _spec is not None and _spec.loader is not None
conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(conftest)


class Item:
    def __init__(self, nodeid, *marks):
        self.nodeid = nodeid
        self.marks = {m.name: m for m in marks}

    def get_closest_marker(self, name):
        return self.marks.get(name)


def mark(name, *args):
    return getattr(pytest.mark, name)(*args).mark


def test_longest_first_groups_together_short_ones_last_in_their_order():
    items = [
        Item("unit/a"),
        Item("int/kargs::1", mark("xdist_group", "kargs"), mark("duration", 155)),
        Item("int/kargs::2", mark("xdist_group", "kargs"), mark("duration", 155)),
        Item("int/main", mark("duration", 920)),
        Item("unit/b"),
        Item("int/campaign[kills]", mark("duration", 450)),
        Item("int/campaign[faults]", mark("duration", 500)),
        Item("int/kargs::3", mark("xdist_group", "kargs"), mark("duration", 155)),
    ]
    conftest.pytest_collection_modifyitems(None, items)
    assert [i.nodeid for i in items] == [
        "int/main", "int/campaign[faults]", "int/campaign[kills]",
        "int/kargs::1", "int/kargs::2", "int/kargs::3", "unit/a", "unit/b"]


def test_every_vm_module_says_how_long_it_takes():
    """A VM test without a duration would start last, behind the short tests, and finish late."""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "integration")
    for name in sorted(os.listdir(here)):
        if name.startswith("test_") and name.endswith(".py"):
            with open(os.path.join(here, name)) as f:
                text = f.read()
            assert "pytest.mark.duration(" in text, f"tests/integration/{name} has no duration mark"
