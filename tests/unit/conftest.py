"""Fixtures shared by the unit tests: the real agent on a Unix socket (agent_rig)."""

from tests.unit.agent_rig import agent

__all__ = ["agent"]
