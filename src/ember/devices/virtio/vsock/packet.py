"""The virtio-vsock wire format (virtio 1.2 §5.10), names verbatim from the specification.

Every packet on the rx and tx queues starts with a ``struct virtio_vsock_hdr``
(§5.10.6), little-endian and packed (44 bytes)::

    le64 src_cid;  le64 dst_cid;  le32 src_port;  le32 dst_port;
    le32 len;      le16 type;     le16 op;        le32 flags;
    le32 buf_alloc;  le32 fwd_cnt;

followed by ``len`` bytes of payload (only for VIRTIO_VSOCK_OP_RW).  The
header may span descriptors: Linux up to 6.1 puts it in a descriptor of its
own, newer kernels put header and payload in one; both are read through a
:class:`BufferList`.  ``buf_alloc`` / ``fwd_cnt`` carry the sender's credit
(§5.10.6.3) in every packet, whatever its op.

The event queue carries ``struct virtio_vsock_event { le32 id; }`` (§5.10.6.7);
the configuration space is ``struct virtio_vsock_config { le64 guest_cid; }``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# §5.10.3 Feature bits
VIRTIO_VSOCK_F_STREAM = 0
VIRTIO_VSOCK_F_SEQPACKET = 1

# Well-known CIDs (include/uapi/linux/vm_sockets.h)
VMADDR_CID_HYPERVISOR = 0
VMADDR_CID_LOCAL = 1
VMADDR_CID_HOST = 2
VMADDR_CID_ANY = 0xFFFF_FFFF

# §5.10.6 struct virtio_vsock_hdr: type
VIRTIO_VSOCK_TYPE_STREAM = 1
VIRTIO_VSOCK_TYPE_SEQPACKET = 2

# §5.10.6 struct virtio_vsock_hdr: op
VIRTIO_VSOCK_OP_INVALID = 0
VIRTIO_VSOCK_OP_REQUEST = 1
VIRTIO_VSOCK_OP_RESPONSE = 2
VIRTIO_VSOCK_OP_RST = 3
VIRTIO_VSOCK_OP_SHUTDOWN = 4
VIRTIO_VSOCK_OP_RW = 5
VIRTIO_VSOCK_OP_CREDIT_UPDATE = 6
VIRTIO_VSOCK_OP_CREDIT_REQUEST = 7

KNOWN_OPS = frozenset(range(VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_CREDIT_REQUEST + 1))

OP_NAMES = {
    VIRTIO_VSOCK_OP_INVALID: "INVALID",
    VIRTIO_VSOCK_OP_REQUEST: "REQUEST",
    VIRTIO_VSOCK_OP_RESPONSE: "RESPONSE",
    VIRTIO_VSOCK_OP_RST: "RST",
    VIRTIO_VSOCK_OP_SHUTDOWN: "SHUTDOWN",
    VIRTIO_VSOCK_OP_RW: "RW",
    VIRTIO_VSOCK_OP_CREDIT_UPDATE: "CREDIT_UPDATE",
    VIRTIO_VSOCK_OP_CREDIT_REQUEST: "CREDIT_REQUEST",
}

# §5.10.6.5 flags of VIRTIO_VSOCK_OP_SHUTDOWN
VIRTIO_VSOCK_SHUTDOWN_RCV = 1  # the sender will receive no more data
VIRTIO_VSOCK_SHUTDOWN_SEND = 2  # the sender will send no more data
VIRTIO_VSOCK_SHUTDOWN_BOTH = VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND

# §5.10.6.7 struct virtio_vsock_event: id
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0

VIRTIO_VSOCK_HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = VIRTIO_VSOCK_HDR.size  # 44
VIRTIO_VSOCK_EVENT = struct.Struct("<I")
VIRTIO_VSOCK_CONFIG = struct.Struct("<Q")

# Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE: no packet payload is larger, either way.
MAX_PKT_BUF_SIZE = 64 * 1024

U32 = 0xFFFF_FFFF


@dataclass(slots=True)
class VsockHeader:
    """One ``struct virtio_vsock_hdr`` (§5.10.6)."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    def pack(self) -> bytes:
        return VIRTIO_VSOCK_HDR.pack(
            self.src_cid,
            self.dst_cid,
            self.src_port,
            self.dst_port,
            self.len,
            self.type,
            self.op,
            self.flags,
            self.buf_alloc & U32,
            self.fwd_cnt & U32,
        )

    @classmethod
    def unpack(cls, data: bytes) -> VsockHeader:
        return cls(*VIRTIO_VSOCK_HDR.unpack(data))

    @property
    def op_name(self) -> str:
        return OP_NAMES.get(self.op, f"op {self.op}")

    def reply(self, op: int, *, flags: int = 0) -> VsockHeader:
        """A header-only packet from the host back to the sender of this one (ports swapped).

        Used for RST to packets that have no connection: a connection stamps
        its own credit into the headers it sends.
        """
        return VsockHeader(
            src_cid=self.dst_cid,
            dst_cid=self.src_cid,
            src_port=self.dst_port,
            dst_port=self.src_port,
            len=0,
            type=VIRTIO_VSOCK_TYPE_STREAM,
            op=op,
            flags=flags,
            buf_alloc=0,
            fwd_cnt=0,
        )


def check_tx_header(hdr: VsockHeader, guest_cid: int, payload_room: int) -> str | None:
    """Why a packet the guest put on the tx queue must be dropped, or None if it may be routed.

    ``payload_room`` is how many device-readable bytes follow the header in
    the chain.  The op is not checked here: a packet that passes this check
    but carries an unknown op is answered with RST (it has a valid address).
    """
    if hdr.src_cid != guest_cid:
        return f"src_cid {hdr.src_cid} is not the guest's CID {guest_cid}"
    if hdr.dst_cid != VMADDR_CID_HOST:
        return f"dst_cid {hdr.dst_cid} is not the host (CID {VMADDR_CID_HOST})"
    if hdr.len > MAX_PKT_BUF_SIZE:
        return f"len {hdr.len} exceeds the {MAX_PKT_BUF_SIZE}-byte packet limit"
    if hdr.len > payload_room:
        return f"len {hdr.len} exceeds the {payload_room} bytes the chain holds"
    if hdr.len and hdr.op != VIRTIO_VSOCK_OP_RW:
        return f"{hdr.op_name} with a {hdr.len}-byte payload"
    return None


def host_header(
    guest_cid: int, local_port: int, peer_port: int, op: int, *, length: int = 0, flags: int = 0
) -> VsockHeader:
    """A header from the host end (CID 2, ``local_port``) to the guest end of a connection."""
    return VsockHeader(
        src_cid=VMADDR_CID_HOST,
        dst_cid=guest_cid,
        src_port=local_port,
        dst_port=peer_port,
        len=length,
        type=VIRTIO_VSOCK_TYPE_STREAM,
        op=op,
        flags=flags,
        buf_alloc=0,
        fwd_cnt=0,
    )
