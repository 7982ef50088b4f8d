"""virtio-vsock: guest stream sockets bridged to host Unix sockets (Firecracker's hybrid vsock)."""

from ember.devices.virtio.vsock.device import DEFAULT_GUEST_CID, Vsock
from ember.devices.virtio.vsock.state import VsockStats

__all__ = ["DEFAULT_GUEST_CID", "Vsock", "VsockStats"]
