"""The TUN/TAP ABI (``<linux/if_tun.h>``, ``Documentation/networking/tuntap.rst``).

Its own leaf module because three layers name it: the device opens TAPs with
it, :mod:`ember.network` makes them, and the seccomp filter must allow exactly
the ioctl virtio-net issues when the guest driver starts the device.
"""

from __future__ import annotations

TUN_PATH = "/dev/net/tun"
IFNAMSIZ = 16
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
# _IOW('T', n, int)
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
# What the TAP may hand us: frames with partial checksums, TCP segments up to 64 KiB.
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
