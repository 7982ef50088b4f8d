"""Snapshots: a paused VM's complete state, written to a directory and restored from it.

A snapshot directory holds two files: ``state`` (the versioned, checksummed
description of vCPUs, irqchip, PIT, clock and devices; :mod:`.format`) and
``memory`` (guest RAM, sparse, mapped ``MAP_PRIVATE`` by every restore so
siblings share its page cache; :mod:`.memory_file`).
"""

from __future__ import annotations

STATE_FILE = "state"
MEMORY_FILE = "memory"
