"""virtio-net (virtio 1.2 §5.1): frames between the guest and a TAP device."""
