"""The bytes of a USTAR archive of regular files, as ``tarfile`` writes them (``format=USTAR_FORMAT``).

Only what the shard writer needs: a header per member (name, mode, size, mtime, owner names, checksum, ``ustar``
magic), the data padded to 512 bytes, and the end of the archive (two zero blocks, then zeros up to tarfile's
10,240-byte record). Building the 512 header bytes directly costs a few µs, where ``tarfile.addfile`` spent ~78 µs
per member (benchmarks/RESULTS.md, "Shards, format version 2"). Names longer than USTAR's 100-byte name field are
refused: tarfile would split them at a ``/`` into its prefix field, which shard member names never need.
"""
from __future__ import annotations

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile pads the finished archive to a multiple of this
NAME_BYTES = 100  # USTAR's name field
MAX_SIZE = 8 ** 11 - 1  # the largest size 11 octal digits hold (8 GiB - 1)
REGULAR_FILE = b"0"


def _octal(value: int, width: int) -> bytes:
    """A numeric field as tarfile writes it: zero-padded octal digits and a NUL, ``width`` bytes in all."""
    return b"%0*o\0" % (width - 1, value)


def _text(value: str, width: int) -> bytes:
    return value.encode().ljust(width, b"\0")


def member_header(name: str, size: int, mode: int = 0o444, mtime: int = 0, owner: str = "bigdata") -> bytes:
    """The 512-byte header of a regular file ``name`` of ``size`` bytes (uid and gid 0, user and group ``owner``)."""
    encoded = name.encode()
    if len(encoded) > NAME_BYTES:
        raise ValueError(f"tar member name {name!r}: {len(encoded)} bytes, expected at most {NAME_BYTES} "
                         "(the USTAR name field)")
    if not 0 <= size <= MAX_SIZE:
        raise ValueError(f"tar member {name!r}: {size} bytes, expected 0 to {MAX_SIZE} (USTAR's size field)")
    before_checksum = (encoded.ljust(NAME_BYTES, b"\0") + _octal(mode, 8) + _octal(0, 8) + _octal(0, 8)
                       + _octal(size, 12) + _octal(mtime, 12))
    after_checksum = (REGULAR_FILE + bytes(NAME_BYTES) + b"ustar\x0000" + _text(owner, 32)
                      + _text(owner, 32)).ljust(BLOCK - len(before_checksum) - 8, b"\0")  # no device numbers
    checksum = sum(before_checksum) + sum(after_checksum) + 8 * ord(" ")  # the field itself counts as spaces
    return before_checksum + b"%06o\0 " % checksum + after_checksum


def member_padding(size: int) -> bytes:
    """The zeros after a member's ``size`` data bytes up to the next 512-byte block."""
    return bytes(-size % BLOCK)


def archive_end(offset: int) -> bytes:
    """What ends an archive whose members took ``offset`` bytes: two zero blocks, then zeros to a whole record."""
    return bytes(2 * BLOCK + -(offset + 2 * BLOCK) % RECORD)
