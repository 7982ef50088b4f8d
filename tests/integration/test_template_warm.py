"""What every restored sandbox finds ready: the common commands' files in the page cache,
C.UTF-8 in the locale archive (so a command maps one file for its locale, not twelve), and
its vsock receive queue topped up (template_warm.top_up_rx)."""

from __future__ import annotations

import ast

from ember import Sandbox

# Run in a fresh sandbox's run_code worker: how many pages of each file the guest's page cache
# holds (mincore on a read-only shared mapping, which faults nothing in), against the file's.
RESIDENT = """
import ctypes, os
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]

def _resident(path):
    size = os.path.getsize(path)
    pages = (size + 4095) // 4096
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
    finally:
        os.close(fd)
    vec = ctypes.create_string_buffer(pages)
    try:
        assert _libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
    finally:
        _libc.munmap(addr, size)
    return [sum(b & 1 for b in vec.raw), pages]

{path: _resident(path) for path in PATHS}
"""

# Neither is used by the template's own boot (an init, python3 and the agent), and no earlier
# call of the test's fresh sandbox touches them.
WARMED = ("/usr/bin/bash", "/usr/bin/sort", "/usr/lib/x86_64-linux-gnu/libpcre2-8.so.0")


def test_a_fresh_sandbox_has_the_common_commands_in_its_page_cache() -> None:
    with Sandbox() as sb:
        result = sb.run_code(f"PATHS = {list(WARMED)!r}\n" + RESIDENT)
        assert result.error is None, result.error
        assert result.value is not None
        counts = ast.literal_eval(result.value)
    for path in WARMED:
        resident, pages = counts[path]
        assert pages > 10 and resident == pages, (path, resident, pages)


def test_commands_take_c_utf8_from_the_locale_archive() -> None:
    with Sandbox() as sb:
        listed = sb.exec(["localedef", "--list-archive"])
        assert listed.exit_code == 0 and b"C.utf8" in listed.stdout.split(), listed
        # bash calls setlocale(LC_ALL, "") with the sandbox's LANG=C.UTF-8: its own mappings
        # show where the locale came from
        maps = sb.exec(["bash", "-c", "echo é; cat /proc/$$/maps"])
    assert maps.exit_code == 0, maps
    assert maps.stdout.startswith("é\n".encode()), maps.stdout[:40]
    text = maps.stdout.decode()
    assert "/usr/lib/locale/locale-archive" in text, text
    assert "/usr/lib/locale/C.utf8/" not in text, text


def test_a_fresh_sandbox_has_its_vsock_receive_queue_topped_up() -> None:
    """Linux refills the queue, ~0.15 s of emulated kernel here, only once fewer than half of
    its buffers are left: a template snapshotted just above that mark made every sandbox's
    second request pay it. Topped up, the first requests use buffers and leave the rest."""

    def vsock() -> dict[str, int]:
        found: dict[str, int] = sb._vmm.control("status")["devices"]["Vsock"]
        return found

    with Sandbox() as sb:
        restored = vsock()
        assert restored["rx_buffers"] > restored["rx_queue_size"] * 3 // 4, restored
        for _ in range(3):
            sb.ping()
        after = vsock()
        used = after["rx_packets"] - restored["rx_packets"]
        assert used >= 3, (restored, after)  # a request each, and no refill since
        assert after["rx_buffers"] == restored["rx_buffers"] - used, (restored, after)
