"""The root file system's cache keys and guest payload (no debootstrap here)."""

from __future__ import annotations

import dataclasses

import pytest

from ember.images import rootfs


def test_payload_is_the_guest_side_only() -> None:
    payload = rootfs.guest_payload()
    assert payload["__init__.py"] == rootfs.GUEST_INIT
    assert "protocol.py" in payload and "agent/__main__.py" in payload
    assert not any(name.startswith(("vmm/", "kvm/", "cli/", "images/")) for name in payload)
    assert "sandbox.py" not in payload  # host-only modules stay out of the guest


def test_base_key_follows_suite_mirror_and_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    base = rootfs.BaseInputs.current()
    assert base.key() == rootfs.BaseInputs.current().key()
    assert dataclasses.replace(base, packages=(*base.packages, "gcc")).key() != base.key()
    assert dataclasses.replace(base, suite="trixie").key() != base.key()
    monkeypatch.setenv(rootfs.MIRROR_ENV, "http://mirror.example/debian")
    assert rootfs.BaseInputs.current().key() != base.key()


def test_image_key_follows_the_payload_but_not_its_order() -> None:
    inputs = rootfs.ImageInputs.current()
    changed = dict(inputs.payload)
    changed["agent/server.py"] = changed["agent/server.py"] + b"\n# edited\n"
    assert dataclasses.replace(inputs, payload=changed).key() != inputs.key()
    reordered = dict(reversed(list(inputs.payload.items())))
    assert dataclasses.replace(inputs, payload=reordered).key() == inputs.key()
