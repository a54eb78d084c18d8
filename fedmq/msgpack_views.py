"""Unpacking msgpack without copying large binaries: the tensor bytes of a decoded message are
read-only views into the received payload. Used by ``fedmq.codec`` only (the msgpack side of the
wire; the field checks stay there).
"""

from __future__ import annotations

from typing import Any

import msgpack

from fedmq.errors import DecodeError

__all__ = ["VIEW_MIN_BYTES", "unpack"]


def _reject_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"msgpack extension type {code} is not allowed")


#: Binary fields at least this long are not copied out of the payload: the decoded tensor views
#: them in place (see ``unpack``). A 1 MB update used to be copied once more, on the hot path.
VIEW_MIN_BYTES = 16 * 1024
#: The scan that finds them walks the document object by object in Python; a document with more
#: objects than this (never a fedmq message) is simply unpacked the ordinary, copying way.
_SCAN_MAX_OBJECTS = 4096
#: The extension type that stands for a viewed binary inside the rewritten document. Real
#: extensions are refused, so the only ones msgpack meets there are these.
_VIEW_EXT = 0x11
# msgpack markers: fixed-size objects (marker -> bytes after it), and the sized ones
# (marker -> width of their big-endian length field).
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
          0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
_BIN = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_STR = {0xD9: 1, 0xDA: 2, 0xDB: 4}
_ARRAY = {0xDC: 2, 0xDD: 4}
_MAP = {0xDE: 2, 0xDF: 4}


def _large_bins(buf: memoryview) -> list[tuple[int, int, int]] | None:
    """(marker offset, data offset, length) of every binary of ``VIEW_MIN_BYTES`` or more.

    None when the document is not one plain msgpack object the scan can walk (truncated, trailing
    bytes, extensions, the reserved marker, too many objects): the caller then unpacks it the
    ordinary way, which reports whatever is wrong with it.
    """
    n = len(buf)
    pos, pending, objects = 0, 1, 0
    found: list[tuple[int, int, int]] = []
    while pending:
        objects += 1
        if pos >= n or objects > _SCAN_MAX_OBJECTS:
            return None
        m = buf[pos]
        pending -= 1
        if m <= 0x7F or m >= 0xE0:  # positive / negative fixint
            pos += 1
        elif m <= 0x8F:  # fixmap
            pending += 2 * (m & 0x0F)
            pos += 1
        elif m <= 0x9F:  # fixarray
            pending += m & 0x0F
            pos += 1
        elif m <= 0xBF:  # fixstr
            pos += 1 + (m & 0x1F)
        elif m in _FIXED:
            pos += 1 + _FIXED[m]
        else:
            width = _BIN.get(m) or _STR.get(m) or _ARRAY.get(m) or _MAP.get(m)
            if width is None or pos + 1 + width > n:  # an extension, 0xC1, or truncated
                return None
            length = int.from_bytes(buf[pos + 1:pos + 1 + width], "big")
            pos += 1 + width
            if m in _ARRAY:
                pending += length
            elif m in _MAP:
                pending += 2 * length
            else:
                if m in _BIN and length >= VIEW_MIN_BYTES:
                    found.append((pos - 1 - width, pos, length))
                pos += length
    return found if pos == n else None


def unpack(payload: bytes | bytearray | memoryview, *, max_bin_len: int,
           max_array_len: int) -> Any:
    """msgpack.unpackb with our caps; large binaries come back as read-only views, not copies.

    When the payload holds large binaries, a small copy of it is unpacked in which each of them
    is replaced by a 5-byte extension carrying its number; the extension hook hands back a view
    of the original bytes. The payload must not change while the result is in use (bytes never
    do; the transport hands over bytes). One difference from plain msgpack: a binary of
    ``VIEW_MIN_BYTES`` or more used as a map key is refused (no fedmq map has binary keys).
    """
    caps: dict[str, Any] = {
        "raw": False, "strict_map_key": True, "use_list": True, "max_str_len": 1 << 20,
        "max_bin_len": max_bin_len, "max_array_len": max_array_len, "max_map_len": 1 << 12,
    }
    view = memoryview(payload).cast("B").toreadonly()
    bins = _large_bins(view) if len(view) >= VIEW_MIN_BYTES else None
    if not bins:
        return msgpack.unpackb(payload, ext_hook=_reject_ext, max_ext_len=0, **caps)
    pieces: list[bytes | memoryview] = []
    views: list[memoryview] = []
    start = 0
    for marker, data, length in bins:
        pieces.append(view[start:marker])
        pieces.append(bytes((0xD6, _VIEW_EXT)) + len(views).to_bytes(4, "big"))  # fixext 4
        views.append(view[data:data + length])
        start = data + length
    pieces.append(view[start:])

    def viewed(code: int, data: bytes) -> memoryview:
        if code != _VIEW_EXT:
            _reject_ext(code, data)
        return views[int.from_bytes(data, "big")]

    return msgpack.unpackb(b"".join(pieces), ext_hook=viewed, max_ext_len=4, **caps)
