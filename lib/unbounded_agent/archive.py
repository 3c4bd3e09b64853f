"""Validation and extraction of the agent release archive for the download-stage step.

The archive is a gzip-compressed tar holding exactly one member: a regular file named exactly
``unbounded-agent``. Anything else is refused with a message that names the problem.

Why our own reader rather than ``tarfile``: Debian 12's Python 3.11.2 has no extraction filters (PEP 706),
and ``tarfile`` applies pax and GNU extension headers silently (a pax ``path`` record renames the member
that follows, ``GNU.sparse`` records change which bytes are its content) and stops at the first zero block
without looking at what follows. Here every header block is read and checked: the name, type and size the
member really has are the ones we validate, and an archive other tools could read differently (``tar -i``
reads past a zero block; a second gzip member is more tar data to ``gzip -d``) is refused.

Memory stays constant: the gzip stream is inflated in bounded pieces and the member goes straight to a
hidden temporary file in the destination directory, named like fsutil's temporaries so that
``fsutil.remove_stale_temps`` sweeps one left by a crash.
"""

import errno
import os
import secrets
import zlib
from pathlib import Path

from .reasons import OpsError, Reason

MEMBER = "unbounded-agent"
_MEMBER = MEMBER.encode()
BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_READ_BYTES = 256 * 1024  # compressed bytes read from the file at a time
_INFLATE_BYTES = 256 * 1024  # decompressed bytes produced at a time: a bomb cannot inflate one read into GBs
_COPY_BYTES = 1024 * 1024  # member bytes written at a time
_MAX_PAX_BYTES = 64 * 1024  # a pax header carries a few timestamps and ids; refuse anything bigger

_REGULAR = (b"0", b"\0")
_EXTENSIONS = {
    b"L": "a GNU long-name header",
    b"K": "a GNU long-link header",
    b"N": "an old GNU long-name header",
}
_KINDS = {
    b"1": "a hard link",
    b"2": "a symbolic link",
    b"3": "a character device",
    b"4": "a block device",
    b"5": "a directory",
    b"6": "a FIFO",
    b"7": "a contiguous file (an unsupported type)",
    b"S": "a GNU sparse file",
    b"V": "a tape volume header",
    b"M": "a multi-volume continuation",
    b"D": "a GNU dump directory",
}
# pax records that would make tools disagree on the member's name, link target, size or content.
# Others (mtime, atime, ctime, uid, gid, uname, gname, comment, xattrs...) are metadata we never apply.
_PAX_REFUSED = {b"path": "name", b"linkpath": "link target", b"size": "size"}
_PAX_SPARSE = b"GNU.sparse."


def extract_agent(archive_path: str | os.PathLike, dest_dir: str | os.PathLike, *, max_extracted_bytes: int) -> Path:
    """Validate the archive and write its member to a new hidden file in ``dest_dir``; return that path.

    The file has mode 0755 whatever the archive says (setuid, setgid and sticky bits are never set) and is
    fsynced; the caller renames it onto the slot. On any error nothing is left in ``dest_dir`` and OpsError
    is raised: InvalidArchive with the specific reason; InsufficientSpace for a full disk; ExecutionFailed
    when the archive cannot be read or ``dest_dir`` cannot be written.
    """
    try:
        f = open(archive_path, "rb")
    except OSError as e:
        raise OpsError(Reason.EXECUTION_FAILED, f"cannot open the archive {archive_path}: {e.strerror}") from None
    out = _Output(Path(dest_dir))
    try:
        with f:
            _extract(f, out, max_extracted_bytes)
        return out.finish()
    except OSError as e:  # reading the archive failed (write failures already are OpsErrors)
        out.discard()
        raise OpsError(Reason.EXECUTION_FAILED, f"cannot read the archive {archive_path}: {e.strerror}") from None
    except BaseException:
        out.discard()
        raise


def _invalid(message: str) -> OpsError:
    return OpsError(Reason.INVALID_ARCHIVE, message)


def _extract(f, out: "_Output", max_extracted_bytes: int) -> None:
    magic = f.read(2)
    if not magic:
        raise _invalid("the archive is empty (0 bytes)")
    if magic != b"\x1f\x8b":
        raise _invalid("the archive is not gzip-compressed: it does not start with the gzip magic bytes 1f 8b")
    f.seek(0)
    stream = _Inflater(f, 2 * max_extracted_bytes)
    found = False
    pax_pending = False  # a pax 'x' header was read and its member has not come yet
    while True:
        offset = stream.position
        block = stream.read(BLOCK)
        if len(block) < BLOCK:
            if found:
                raise _invalid(f"the tar end-of-archive marker is missing after '{MEMBER}' (truncated archive?)")
            if offset == 0 and not block:
                raise _invalid("the gzip stream is empty: it holds no tar archive")
            raise _invalid(f"the tar archive is truncated: it ends inside a header at offset {offset}")
        if block == _ZERO_BLOCK:
            if pax_pending:
                raise _invalid("a pax extended header is not followed by a member")
            if not found:
                raise _invalid(f"the archive holds no member: exactly one file, '{MEMBER}', is expected")
            _expect_end(stream)
            return
        header = _Header(block, offset)
        if header.type in (b"x", b"g"):
            if header.type == b"x":
                if pax_pending:
                    raise _invalid(f"two pax extended headers in a row at offset {offset}")
                pax_pending = True
            _check_pax(_read_data(stream, header, _MAX_PAX_BYTES, "a pax extended header"), offset)
            continue
        pax_pending = False
        if header.type in _EXTENSIONS:
            raise _invalid(
                f"the archive uses {_EXTENSIONS[header.type]} (it would rename the member that follows); refused"
            )
        name = header.name
        _check_path(name)
        if found:
            if name == _MEMBER:
                raise _invalid(f"duplicate member '{MEMBER}': the archive must hold it exactly once")
            raise _invalid(f"unexpected second member {_show(name)}: the archive must hold only '{MEMBER}'")
        if header.type not in _REGULAR:
            kind = _KINDS.get(header.type, f"an unknown type {header.type!r}")
            target = f" to {_show(header.linkname)}" if header.type in (b"1", b"2") else ""
            raise _invalid(f"member {_show(name)} is {kind}{target}; only a regular file is accepted")
        if name != _MEMBER:
            raise _invalid(
                f"unexpected member {_show(name)}: the archive must hold exactly one regular file named '{MEMBER}'"
            )
        size = header.size
        if size == 0:
            raise _invalid(f"member '{MEMBER}' is empty (0 bytes)")
        if size > max_extracted_bytes:
            raise _invalid(
                f"member '{MEMBER}' declares {size} bytes, more than maxExtractedBytes ({max_extracted_bytes})"
            )
        out.open()
        remaining = size
        while remaining:
            data = stream.read(min(remaining, _COPY_BYTES))
            if not data:
                done = size - remaining
                raise _invalid(f"the tar archive is truncated: member '{MEMBER}' ends after {done} of {size} bytes")
            out.write(data)
            remaining -= len(data)
        _skip_padding(stream, size)
        found = True


def _expect_end(stream: "_Inflater") -> None:
    """After the first zero block: only zeros may follow (the marker's second block and record padding)."""
    zeros = BLOCK
    while chunk := stream.read(_INFLATE_BYTES):
        if chunk.count(0) != len(chunk):
            at = stream.position - len(chunk) + next(i for i, b in enumerate(chunk) if b)
            raise _invalid(f"unexpected data after the tar end-of-archive marker (at offset {at})")
        zeros += len(chunk)
    if zeros < 2 * BLOCK:
        raise _invalid("the tar end-of-archive marker is incomplete (one zero block of two): truncated archive?")


def _read_data(stream: "_Inflater", header: "_Header", limit: int, what: str) -> bytes:
    if header.size > limit:
        raise _invalid(f"{what} at offset {header.offset} is {header.size} bytes (more than {limit})")
    data = stream.read(header.size)
    if len(data) < header.size:
        raise _invalid(f"the tar archive is truncated inside {what} at offset {header.offset}")
    _skip_padding(stream, header.size)
    return data


def _skip_padding(stream: "_Inflater", size: int) -> None:
    pad = -size % BLOCK
    if pad and len(stream.read(pad)) < pad:
        raise _invalid("the tar archive is truncated: the last block is incomplete")


def _check_path(name: bytes) -> None:
    if not name:
        raise _invalid("a member has an empty name")
    if name.startswith(b"/"):
        raise _invalid(f"member {_show(name)} has an absolute path")
    if b".." in name.split(b"/"):
        raise _invalid(f"member {_show(name)} has a '..' component (path traversal)")
    if b"\\" in name:
        raise _invalid(f"member {_show(name)} contains a backslash")


def _check_pax(data: bytes, offset: int) -> None:
    """Parse pax records ("<length> <key>=<value>\\n") and refuse those that change the member."""
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # NUL padding after the last record, and nothing else
            if data.count(0, pos) != len(data) - pos:
                raise _invalid(f"malformed pax extended header at offset {offset}")
            break
        space = data.find(b" ", pos, pos + 20)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise _invalid(f"malformed pax extended header at offset {offset}")
        end = pos + int(digits)
        record = data[space + 1 : end]
        key, eq, _ = record.partition(b"=")
        if end > len(data) or not eq or not record.endswith(b"\n") or not key:
            raise _invalid(f"malformed pax extended header at offset {offset}")
        if key in _PAX_REFUSED:
            raise _invalid(
                f"a pax extended header sets {_show(key)}, which would change the member's "
                f"{_PAX_REFUSED[key]} as other tools read it; refused"
            )
        if key.startswith(_PAX_SPARSE):
            raise _invalid(f"a pax extended header makes the member a GNU sparse file ({_show(key)}); refused")
        pos = end


def _show(name: bytes) -> str:
    """A member name for a message: quoted, escaped, and short (names come from an untrusted archive)."""
    text = repr(name.decode("utf-8", "backslashreplace"))
    return text if len(text) <= 120 else text[:117] + "..."


class _Header:
    def __init__(self, block: bytes, offset: int):
        self.offset = offset
        try:
            stored = _number(block[148:156], offset, "checksum")
        except OpsError:
            stored = None  # reported below as a checksum mismatch: this is not a header at all
        rest = block[:148] + b" " * 8 + block[156:]
        # POSIX says unsigned bytes; some old tars summed signed chars. Accept either, as GNU tar does.
        if stored not in (sum(rest), sum(b - 256 if b > 127 else b for b in rest)):
            if offset == 0:
                raise _invalid("the gzip stream does not hold a tar archive (the first header's checksum is wrong)")
            raise _invalid(f"corrupt tar header at offset {offset} (checksum mismatch)")
        self.type = block[156:157]
        self.name = block[0:100].split(b"\0", 1)[0]
        self.linkname = block[157:257].split(b"\0", 1)[0]
        if block[257:263] == b"ustar\0":  # POSIX ustar: a prefix field continues the name (GNU uses it otherwise)
            prefix = block[345:500].split(b"\0", 1)[0]
            if prefix:
                self.name = prefix + b"/" + self.name
        self.size = _number(block[124:136], offset, "size")


def _number(field: bytes, offset: int, what: str) -> int:
    """A tar numeric field: octal text, or GNU base-256 when the high bit of the first byte is set."""
    if field[0] & 0x80:
        if field[0] == 0xFF:
            raise _invalid(f"corrupt tar header at offset {offset} (negative {what})")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.replace(b"\0", b" ").strip()
    if not text:
        return 0
    if not all(0x30 <= b <= 0x37 for b in text):
        raise _invalid(f"corrupt tar header at offset {offset} (the {what} field is not an octal number)")
    return int(text, 8)


class _Inflater:
    """The decompressed bytes of a single-member gzip file, produced in bounded pieces.

    Enforces the cap on the whole decompressed stream (a gzip bomb may hide in tar padding, where no
    member size bounds it), and at the end requires the gzip trailer (its CRC-32 and length checked by
    zlib) and nothing after it.
    """

    def __init__(self, f, cap: int):
        self._f = f
        self._cap = cap
        self._inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip container only
        self._buffer = bytearray()
        self._compressed = 0
        self._produced = 0
        self._ended = False
        self.position = 0  # offset in the decompressed stream of the next byte read()

    def read(self, n: int) -> bytes:
        """Exactly n bytes, or fewer only at the end of the stream."""
        while len(self._buffer) < n and not self._ended:
            self._inflate_more()
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        self.position += len(data)
        return data

    def _inflate_more(self) -> None:
        pending = self._inflate.unconsumed_tail
        if not pending:
            pending = self._f.read(_READ_BYTES)
            if not pending:
                raise _invalid(
                    f"the gzip stream is truncated: the file ends after {self._compressed} bytes, "
                    "before the gzip trailer"
                )
            self._compressed += len(pending)
        try:
            data = self._inflate.decompress(pending, _INFLATE_BYTES)
        except zlib.error as e:
            raise _invalid(f"corrupt gzip data ({e})") from None
        self._produced += len(data)
        if self._produced > self._cap:
            raise _invalid(
                f"the decompressed archive exceeds twice maxExtractedBytes ({self._cap} bytes): refused as a gzip bomb"
            )
        self._buffer += data
        if self._inflate.eof:
            self._ended = True
            if self._inflate.unused_data or self._f.read(1):
                raise _invalid(
                    "unexpected data after the end of the gzip stream (a second gzip member or garbage); refused"
                )


class _Output:
    """The hidden temporary file the member is written to; removed unless finish() succeeds."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.path: Path | None = None
        self._fd: int | None = None

    def open(self) -> None:
        self.path = self.directory / f".{MEMBER}.tmp-{secrets.token_hex(4)}"
        try:
            # 0600 while incomplete; O_NOFOLLOW|O_EXCL: never write through something planted at that name.
            self._fd = os.open(
                self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as e:
            self.path = None
            raise _io_error(e, f"cannot create a file in {self.directory}") from None

    def _opened(self) -> tuple[int, Path]:
        # open() sets both or neither, and write()/finish() are only called after it succeeded.
        assert self._fd is not None and self.path is not None, "the member's output file is not open"
        return self._fd, self.path

    def write(self, data: bytes) -> None:
        fd, path = self._opened()
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError as e:
            raise _io_error(e, f"cannot write {path}") from None

    def finish(self) -> Path:
        fd, path = self._opened()
        try:
            os.fchmod(fd, 0o755)  # never the archive's mode: no setuid, setgid or sticky bit
            os.fsync(fd)
        except OSError as e:
            raise _io_error(e, f"cannot write {path}") from None
        os.close(fd)
        self._fd = None
        return path

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def _io_error(e: OSError, what: str) -> OpsError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OpsError(Reason.INSUFFICIENT_SPACE, f"{what}: {e.strerror}")
    return OpsError(Reason.EXECUTION_FAILED, f"{what}: {e.strerror}")
