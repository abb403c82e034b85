"""The repository's suites and tests use the vfiotest pytest plugin (vfiotest.fixtures, the
top-level fixtures/ directory). Installed, it is loaded through its `pytest11` entry point
already; this line loads it where entry points are off (PYTEST_DISABLE_PLUGIN_AUTOLOAD)."""

pytest_plugins = ["vfiotest.fixtures"]
