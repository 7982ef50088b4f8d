"""Virtio devices and the split virtqueue they share (virtio 1.2, §2 and §4.2)."""
