"""Opening a TAP device as virtio-net's backend (``Documentation/networking/tuntap.rst``).

The TAP carries one Ethernet frame per read/write with a 12-byte
``virtio_net_hdr_v1`` in front (``IFF_VNET_HDR`` + ``TUNSETVNETHDRSZ``), the
same header the guest driver uses, so frames and their offload hints pass
between guest and host kernel without being looked at.

The TAP is usually made beforehand (persistent, in the sandbox's network
namespace, by :mod:`ember.network`); the VMM only attaches to it, entering
that namespace for the one ``open`` + ``TUNSETIFF`` and leaving it again.
"""

from __future__ import annotations

import fcntl
import os
import struct

from ember.errors import ConfigError
from ember.network.if_tun import (
    IFF_NO_PI,
    IFF_TAP,
    IFF_VNET_HDR,
    IFNAMSIZ,
    TUN_PATH,
    TUNSETIFF,
    TUNSETOFFLOAD,
    TUNSETVNETHDRSZ,
)
from ember.network.netns import set_net_namespace

VNET_HDR_SIZE = 12


def open_tap(name: str, netns: str | None = None) -> int:
    """A non-blocking fd on TAP ``name`` (in the namespace at path ``netns``, if given)."""
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name:
        raise ConfigError(f"TAP name {name!r} is not a valid interface name")
    if netns is None:
        return _attach(name)
    try:
        target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"network namespace {netns}: {exc.strerror}") from None
    home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target, f"cannot enter network namespace {netns}")
        try:
            return _attach(name)
        finally:
            _setns(home, "cannot return to the VMM's network namespace")
    finally:
        os.close(target)
        os.close(home)


def _attach(name: str) -> int:
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot open {TUN_PATH}: {exc.strerror}") from None
    try:
        ifreq = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        try:
            fcntl.ioctl(fd, TUNSETIFF, ifreq)
        except OSError as exc:
            raise ConfigError(f"cannot attach to TAP {name}: {exc.strerror}") from None
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
        set_offload(fd, 0)  # nothing until the guest says what it can take
        return fd
    except BaseException:
        os.close(fd)
        raise


def set_offload(fd: int, flags: int) -> None:
    """Tell the TAP which offloaded frames the guest accepts (``TUN_F_*``)."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)


def _setns(fd: int, what: str) -> None:
    try:
        set_net_namespace(fd)
    except OSError as exc:
        raise ConfigError(f"{what}: {exc.strerror}") from None
