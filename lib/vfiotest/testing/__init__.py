"""Test doubles, not the harness: `simsysfs.SimulatedHost`, a simulated sysfs with the kernel's
behaviour, for the unit tests, the benchmarks and the `sim:DIR` target (vfiotest.targets). Nothing
else in the library imports this package."""
