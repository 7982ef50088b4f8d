"""Sandbox networking on the host: a namespace, a TAP and an egress allow-list per sandbox."""

from ember.network.policy import Allow, NetworkPolicy

__all__ = ["Allow", "NetworkPolicy"]
