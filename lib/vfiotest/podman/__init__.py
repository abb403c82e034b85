"""The podman layer: containers through podman-py, one API service per OCI runtime.

- `conf.PodmanBaseSettings`: the containers.conf drop-in these machines need, undone at teardown.
- `service.PodmanService`: `podman --runtime X system service` on the target; its socket reached
  directly (local) or through the target's paramiko connection (SSH).
- `client.RuntimeClient`: podman-py bound to that runtime: run with devices, caps, ulimits,
  annotations; logs, exit code, OCIRuntime; every container it made removed at cleanup.
- `image`: the probe image built with mmdebstrap, cached by its inputs, `podman import`ed.
- `probe`: the in-container VFIO probe (standard library only).
"""

from .client import VFIO_ANNOTATION, ContainerError, RunResult, RuntimeClient, vfio_devices
from .conf import PodmanBaseSettings
from .image import Image, ImageRecipe, ensure_image
from .service import PodmanService

__all__ = ["ContainerError", "RunResult", "RuntimeClient", "VFIO_ANNOTATION", "vfio_devices",
           "PodmanBaseSettings", "Image", "ImageRecipe", "ensure_image", "PodmanService"]
