"""Ember: microVM sandboxes on KVM behind a hypervisor written in Python."""

from ember.errors import (
    BuildError,
    ConfigError,
    EmberError,
    GuestCrashed,
    ImageError,
    ImageNotBuilt,
    KvmError,
)

__all__ = [
    "BuildError",
    "ConfigError",
    "EmberError",
    "GuestCrashed",
    "ImageError",
    "ImageNotBuilt",
    "KvmError",
]
__version__ = "0.1.0"
