"""Sandbox networking on the host: a namespace, a TAP, an egress allow-list (by address or by
name, through the sandbox's own DNS resolver) per sandbox."""

from ember.network.policy import Allow, AllowName, NetworkPolicy

__all__ = ["Allow", "AllowName", "NetworkPolicy"]
