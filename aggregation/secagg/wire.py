"""Lists of byte strings (and of site names) in one value of a stage message or of the site's state.

A Flower ``ConfigRecord`` checks, stores and serialises a list element by element; the
protocol's lists (public keys, encrypted shares: one per neighbour) travel and persist as
one value each instead: public keys concatenated (32 bytes each), other strings each
behind a 4-byte little-endian length. A value that does not parse is a ``ValueError``
naming what is wrong (the stage then refuses or rejects the message with it).
"""

from __future__ import annotations

from collections.abc import Sequence

KEY_BYTES = 32


def join(items: Sequence[bytes]) -> bytes:
    """``items`` as one value: each behind its 4-byte length."""
    return b"".join(len(b).to_bytes(4, "little") + bytes(b) for b in items)


def split(data: bytes, what: str = "list") -> list[bytes]:
    """The strings :func:`join` put in ``data``."""
    data = bytes(data)
    out, pos = [], 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise ValueError(f"malformed {what}: truncated length at byte {pos}")
        size = int.from_bytes(data[pos : pos + 4], "little")
        pos += 4
        if pos + size > len(data):
            raise ValueError(f"malformed {what}: an item of {size} bytes runs past the end ({len(data)} bytes)")
        out.append(data[pos : pos + size])
        pos += size
    return out


def join_keys(keys: Sequence[bytes]) -> bytes:
    """32-byte public keys, concatenated."""
    if any(len(k) != KEY_BYTES for k in keys):
        raise ValueError(f"public keys must be {KEY_BYTES} bytes each")
    return b"".join(bytes(k) for k in keys)


def split_keys(data: bytes, count: int, what: str = "public keys") -> list[bytes]:
    """The ``count`` keys :func:`join_keys` put in ``data``."""
    data = bytes(data)
    if len(data) != KEY_BYTES * count:
        raise ValueError(f"malformed {what}: {len(data)} bytes for {count} keys of {KEY_BYTES} bytes")
    return [data[k * KEY_BYTES : (k + 1) * KEY_BYTES] for k in range(count)]


def split_fixed(data: bytes, count: int, size: int, what: str = "list") -> list[bytes]:
    """``count`` strings of ``size`` bytes each, concatenated in ``data``."""
    data = bytes(data)
    if len(data) != size * count:
        raise ValueError(f"malformed {what}: {len(data)} bytes for {count} items of {size} bytes")
    return [data[k * size : (k + 1) * size] for k in range(count)]


#: A site name on the wire: printable, no separator, at most this long.
MAX_NAME = 200


def is_name(name: object) -> bool:
    """A site name that can travel: a printable string of 1..MAX_NAME characters (no line break)."""
    return isinstance(name, str) and 0 < len(name) <= MAX_NAME and name.isprintable()


def join_names(names: Sequence[str]) -> str:
    """Site names as one string, one per line (a ConfigRecord checks a list item by item; a site's
    neighbours, survivors and recipients travel as one value)."""
    if not all(is_name(n) for n in names):
        raise ValueError(f"site names must be printable, without a line break, 1..{MAX_NAME} characters")
    return "\n".join(names)


def split_names(value: object, what: str = "names") -> list[str]:
    """The names :func:`join_names` put in ``value`` (``ValueError`` if it is not such a string)."""
    if not isinstance(value, str):
        raise ValueError(f"{what!r} is not a string of site names")
    names = value.split("\n") if value else []
    if not all(is_name(n) for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{what!r} is not a list of distinct site names (printable, 1..{MAX_NAME} characters)")
    return names
