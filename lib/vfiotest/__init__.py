"""vfiotest: SR-IOV/VFIO passthrough harness for Kata Containers under podman.

The modules used inside a guest (errors, pci, host, bind) stay standard-library
only: the guest hook ships them into the Kata guest image.
"""

__version__ = "0.1.0"
