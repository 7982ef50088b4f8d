"""A file's stamp: what says it is still the file read before, without reading it again.

Ember writes what it caches (templates, images, their keys) once and renames it into place,
so a file replaced since has another inode, and one written in place another size or
modification time; one written in place with its modification time put back still has
another change time, which nothing but the kernel sets. The device tells two file systems'
equal inode numbers apart. Users of stamps: a template's checksum remembered
(:func:`ember.templates.verify`), a spare made from a template (:mod:`ember.sandbox.spares`),
a restore made ahead (:mod:`ember.snapshot.premade`), the image keys' memo
(:mod:`ember.images.keymemo`).
"""

from __future__ import annotations

import os
from pathlib import Path

Stamp = tuple[int, int, int, int, int]  # device, inode, size, mtime (ns), ctime (ns)


def stamp(path: str | Path) -> Stamp | None:
    """``path``'s stamp (following symlinks), None if it cannot be stat'ed (not there)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
