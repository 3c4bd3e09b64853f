"""Release archives for tests: valid ones in the formats real tools write, and malformed ones.

Shared by the fast tests (tests/test_archive.py) and the test-host tests, which serve these files over
HTTPS inside a test host and expect the same reason end to end:

    from archives import MALFORMED, valid_archive
    case = MALFORMED["symlink"]
    case(path, max_extracted_bytes)   # writes the file; expect case.reason, and case.message in the error

Cases whose outcome depends on the bound (the bombs, "member over maxExtractedBytes") are built for the
``max_extracted_bytes`` given, which must be the one the agent under test is configured with.

Malformed archives are written block by block (tarfile would refuse to write most of them). Parts are
streamed into gzip, so a bomb sized for the default bound (256 MiB) never sits in memory.
"""

import dataclasses
import gzip
import io
import os
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

from unbounded_agent.config import Config
from unbounded_agent.reasons import Reason

MEMBER = "unbounded-agent"
BLOCK = 512
END = bytes(2 * BLOCK)  # the tar end-of-archive marker
AGENT = b"#!/bin/sh\necho unbounded-agent 9.9.9\n"  # a small stand-in for the agent


# --- building blocks ---------------------------------------------------------------------------------


def header(
    name: str | bytes,
    size: int = 0,
    *,
    type: bytes = b"0",
    linkname: str | bytes = b"",
    mode: int = 0o755,
    prefix: bytes = b"",
    magic: bytes = b"ustar\x0000",
    size_field: bytes | None = None,
    bad_checksum: bool = False,
) -> bytes:
    """One 512-byte tar header block; ``magic`` defaults to POSIX ustar (use b"ustar  \\0" for GNU)."""
    name = name.encode() if isinstance(name, str) else name
    linkname = linkname.encode() if isinstance(linkname, str) else linkname
    b = bytearray(BLOCK)
    b[0 : len(name)] = name[:100]
    b[100:108] = b"%07o\0" % mode
    b[108:116] = b"0000000\0"  # uid
    b[116:124] = b"0000000\0"  # gid
    b[124:136] = size_field if size_field is not None else b"%011o\0" % size
    b[136:148] = b"00000000000\0"  # mtime
    b[156:157] = type
    b[157 : 157 + len(linkname)] = linkname[:100]
    b[257:265] = magic
    b[265:269] = b"root"
    b[297:301] = b"root"
    b[345 : 345 + len(prefix)] = prefix
    b[148:156] = b" " * 8
    checksum = sum(b) + (1 if bad_checksum else 0)
    b[148:156] = b"%06o\0 " % checksum
    return bytes(b)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def member(name: str | bytes, data: bytes = AGENT, **kw) -> bytes:
    """A header and its data, padded to whole blocks; ``size`` in kw overrides the declared size."""
    kw.setdefault("size", len(data))
    return header(name, **kw) + pad(data)


def pax(records: dict[str, str], *, type: bytes = b"x") -> bytes:
    """A pax extended header ('x' for the next member, 'g' global) carrying ``records``."""
    body = b""
    for key, value in records.items():
        text = f" {key}={value}\n".encode()
        length = len(text) + 1
        while len(str(length)) + len(text) != length:
            length += 1
        body += str(length).encode() + text
    return member(f"./PaxHeaders.0/{MEMBER}", body, type=type)


def zeros(n: int, chunk: int = 1 << 20) -> Iterable[bytes]:
    while n > 0:
        yield bytes(min(n, chunk))
        n -= chunk


def write_gz(path: str | os.PathLike, *parts: bytes | Iterable[bytes], trailer: bytes = b"") -> Path:
    """gzip the concatenation of parts into path (parts may be generators), then append ``trailer`` raw."""
    path = Path(path)
    with open(path, "wb") as f:
        with gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="", compresslevel=6) as gz:
            for part in parts:
                for piece in [part] if isinstance(part, bytes) else part:
                    gz.write(piece)
        f.write(trailer)
    return path


# --- valid archives ----------------------------------------------------------------------------------


def valid_archive(path: str | os.PathLike, content: bytes) -> Path:
    """The archive `make release` builds (packaging/build_release.py): GNU format, one member, gzip."""
    info = tarfile.TarInfo(MEMBER)
    info.size = len(content)
    info.mode = 0o755
    info.uname = info.gname = "root"
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(content))
    return write_gz(path, raw.getvalue())


def _tarfile_archive(fmt: int, mode: int = 0o755, mtime: float = 0):
    def build(path: Path, content: bytes) -> Path:
        info = tarfile.TarInfo(MEMBER)
        info.size, info.mode, info.mtime = len(content), mode, mtime
        with tarfile.open(path, "w:gz", format=fmt) as tar:
            tar.addfile(info, io.BytesIO(content))
        return path

    return build


def _gnu_tar(*options: str):
    """An archive written by the GNU tar program itself (its record padding, its headers)."""

    def build(path: Path, content: bytes) -> Path:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / MEMBER).write_bytes(content)
            os.chmod(Path(tmp) / MEMBER, 0o755)
            subprocess.run(["tar", *options, "-czf", str(path), "-C", tmp, MEMBER], check=True)
        return path

    return build


def _go_style(path: Path, content: bytes) -> Path:
    # Go's archive/tar (upstream's tooling) ends with exactly two zero blocks and no record padding.
    return write_gz(path, member(MEMBER, content), END)


def _with_global_pax(path: Path, content: bytes) -> Path:
    # `git archive` puts a global pax header with the commit id first.
    return write_gz(path, pax({"comment": "0123456789abcdef"}, type=b"g"), member(MEMBER, content), END)


# Each builds path holding `content` as its only member and must be accepted.
VALID: dict[str, Callable[[Path, bytes], Path]] = {
    "release (tarfile GNU format)": valid_archive,
    "tarfile PAX format, float mtime (pax header with mtime)": _tarfile_archive(tarfile.PAX_FORMAT, mtime=1.5),
    "tarfile ustar format": _tarfile_archive(tarfile.USTAR_FORMAT),
    "GNU tar, default format": _gnu_tar(),
    "GNU tar --format=posix (pax headers with atime/ctime)": _gnu_tar("--format=posix"),
    "Go archive/tar layout (no record padding)": _go_style,
    "global pax comment header (git archive)": _with_global_pax,
    "setuid/setgid/sticky mode in the archive": _tarfile_archive(tarfile.GNU_FORMAT, mode=0o7755),
    "mode 0644 in the archive": _tarfile_archive(tarfile.GNU_FORMAT, mode=0o644),
}


# --- malformed archives ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    reason: Reason
    message: str  # a substring the error message must contain
    build: Callable[[Path, int], None]  # (path, max_extracted_bytes)

    def __call__(self, path: str | os.PathLike, max_extracted_bytes: int = Config.max_extracted_bytes) -> Path:
        self.build(Path(path), max_extracted_bytes)
        return Path(path)


def _tar(*parts):
    """A builder gzipping fixed parts (bytes or zero-argument callables returning bytes)."""
    return lambda path, _max: write_gz(path, *parts)


def _truncated_gzip(path: Path, _max: int) -> None:
    valid_archive(path, os.urandom(64 * 1024))  # random: the compressed file is big enough to cut in half
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_gzip(path: Path, _max: int) -> None:
    valid_archive(path, os.urandom(64 * 1024))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the deflate data: caught by zlib or by the gzip CRC-32
    path.write_bytes(bytes(data))


def _trailing_after_gzip(path: Path, _max: int) -> None:
    valid_archive(path, AGENT)
    with open(path, "ab") as f:
        f.write(b"trailing garbage")


def _second_gzip_member(path: Path, _max: int) -> None:
    # `gzip -d` would decompress both members and tar would read the second as more archive.
    valid_archive(path, AGENT)
    with open(path, "ab") as f:
        f.write(gzip.compress(member("evil", b"x") + END))


def _plain_tar(path: Path, _max: int) -> None:
    path.write_bytes(member(MEMBER) + END)


def _member_too_large(path: Path, max_extracted: int) -> None:
    write_gz(path, header(MEMBER, max_extracted + 1), zeros(max_extracted + 1 + (-(max_extracted + 1) % BLOCK)), END)


def _bomb_in_padding(path: Path, max_extracted: int) -> None:
    # A small valid member, then more than twice the bound of zeros: no member size bounds them.
    write_gz(path, member(MEMBER), END, zeros(2 * max_extracted + BLOCK))


def _bomb_declared_huge(path: Path, max_extracted: int) -> None:
    # A header declaring 8 GiB - 1 (the largest octal size); refused before any data is read.
    write_gz(path, header(MEMBER, size_field=b"77777777777\0"), zeros(BLOCK))


def _zlib_wrapped(path: Path, _max: int) -> None:
    path.write_bytes(zlib.compress(member(MEMBER) + END))


_CASES = [
    # gzip level
    Case("empty file", Reason.INVALID_ARCHIVE, "empty (0 bytes)", lambda p, m: p.write_bytes(b"")),
    Case("not gzip: HTML error page", Reason.INVALID_ARCHIVE, "not gzip-compressed",
         lambda p, m: p.write_bytes(b"<html><body>404 Not Found</body></html>\n")),
    Case("not gzip: plain tar", Reason.INVALID_ARCHIVE, "not gzip-compressed", _plain_tar),
    Case("not gzip: zlib stream", Reason.INVALID_ARCHIVE, "not gzip-compressed", _zlib_wrapped),
    Case("truncated gzip", Reason.INVALID_ARCHIVE, "gzip stream is truncated", _truncated_gzip),
    Case("corrupt gzip", Reason.INVALID_ARCHIVE, "corrupt gzip data", _corrupt_gzip),
    Case("garbage after the gzip stream", Reason.INVALID_ARCHIVE, "after the end of the gzip stream",
         _trailing_after_gzip),
    Case("second gzip member", Reason.INVALID_ARCHIVE, "after the end of the gzip stream", _second_gzip_member),
    Case("gzip of nothing", Reason.INVALID_ARCHIVE, "holds no tar archive", _tar(b"")),
    Case("gzip of text, not tar", Reason.INVALID_ARCHIVE, "does not hold a tar archive",
         _tar(pad(b"hello world\n" * 50))),
    # sizes
    Case("member over maxExtractedBytes", Reason.INVALID_ARCHIVE, "more than maxExtractedBytes", _member_too_large),
    Case("member declaring 8 GiB", Reason.INVALID_ARCHIVE, "more than maxExtractedBytes", _bomb_declared_huge),
    Case("gzip bomb in tar padding", Reason.INVALID_ARCHIVE, "gzip bomb", _bomb_in_padding),
    Case("negative base-256 size", Reason.INVALID_ARCHIVE, "negative size",
         _tar(header(MEMBER, size_field=b"\xff" * 12), END)),
    Case("non-octal size", Reason.INVALID_ARCHIVE, "not an octal number",
         _tar(header(MEMBER, size_field=b"12x4\0       "), END)),
    # tar structure
    Case("no members", Reason.INVALID_ARCHIVE, "holds no member", _tar(END)),
    Case("bad header checksum", Reason.INVALID_ARCHIVE, "checksum is wrong",
         _tar(header(MEMBER, len(AGENT), bad_checksum=True) + pad(AGENT), END)),
    Case("member data truncated", Reason.INVALID_ARCHIVE, "ends after",
         _tar(header(MEMBER, 4096) + pad(AGENT))),
    Case("declared size shorter than the data", Reason.INVALID_ARCHIVE, "corrupt tar header",
         _tar(header(MEMBER, 10) + pad(AGENT * 40), END)),
    Case("no end-of-archive marker", Reason.INVALID_ARCHIVE, "end-of-archive marker is missing", _tar(member(MEMBER))),
    Case("half an end-of-archive marker", Reason.INVALID_ARCHIVE, "marker is incomplete",
         _tar(member(MEMBER), bytes(BLOCK))),
    Case("garbage after the end-of-archive marker", Reason.INVALID_ARCHIVE, "after the tar end-of-archive marker",
         _tar(member(MEMBER), END, b"not padding")),
    Case("member hidden after a zero block (tar -i)", Reason.INVALID_ARCHIVE, "after the tar end-of-archive marker",
         _tar(member(MEMBER), END, member("evil", b"x"), END)),
    # names
    Case("wrong name", Reason.INVALID_ARCHIVE, "unexpected member 'agent'", _tar(member("agent"), END)),
    Case("./ prefix", Reason.INVALID_ARCHIVE, "unexpected member './unbounded-agent'",
         _tar(member(f"./{MEMBER}"), END)),
    Case("nested path", Reason.INVALID_ARCHIVE, "unexpected member 'bin/unbounded-agent'",
         _tar(member(f"bin/{MEMBER}"), END)),
    Case("ustar prefix field", Reason.INVALID_ARCHIVE, "unexpected member 'x/unbounded-agent'",
         _tar(member(MEMBER, prefix=b"x"), END)),
    Case("traversal ../", Reason.INVALID_ARCHIVE, "path traversal", _tar(member(f"../{MEMBER}"), END)),
    Case("traversal inside the path", Reason.INVALID_ARCHIVE, "path traversal", _tar(member(f"a/../../{MEMBER}"), END)),
    Case("absolute path", Reason.INVALID_ARCHIVE, "absolute path", _tar(member(f"/usr/bin/{MEMBER}"), END)),
    Case("backslash", Reason.INVALID_ARCHIVE, "backslash", _tar(member(f"..\\{MEMBER}"), END)),
    Case("trailing slash", Reason.INVALID_ARCHIVE, "unexpected member 'unbounded-agent/'",
         _tar(member(f"{MEMBER}/"), END)),
    # members
    Case("empty member", Reason.INVALID_ARCHIVE, "is empty (0 bytes)", _tar(member(MEMBER, b""), END)),
    Case("two members (LICENSE after)", Reason.INVALID_ARCHIVE, "unexpected second member 'LICENSE'",
         _tar(member(MEMBER), member("LICENSE", b"Apache-2.0\n"), END)),
    Case("two members (LICENSE first)", Reason.INVALID_ARCHIVE, "unexpected member 'LICENSE'",
         _tar(member("LICENSE", b"Apache-2.0\n"), member(MEMBER), END)),
    Case("duplicate member", Reason.INVALID_ARCHIVE, "duplicate member",
         _tar(member(MEMBER), member(MEMBER, b"#!/bin/sh\nexit 42\n"), END)),
    Case("directory then member", Reason.INVALID_ARCHIVE, "is a directory",
         _tar(member("bin/", b"", type=b"5"), member(MEMBER), END)),
    # types
    Case("symlink", Reason.INVALID_ARCHIVE, "is a symbolic link to '/bin/sh'",
         _tar(member(MEMBER, b"", type=b"2", linkname="/bin/sh"), END)),
    Case("hard link", Reason.INVALID_ARCHIVE, "is a hard link to 'etc/passwd'",
         _tar(member(MEMBER, b"", type=b"1", linkname="etc/passwd"), END)),
    Case("directory", Reason.INVALID_ARCHIVE, "is a directory", _tar(member(f"{MEMBER}/", b"", type=b"5"), END)),
    Case("character device", Reason.INVALID_ARCHIVE, "is a character device",
         _tar(member(MEMBER, b"", type=b"3"), END)),
    Case("block device", Reason.INVALID_ARCHIVE, "is a block device", _tar(member(MEMBER, b"", type=b"4"), END)),
    Case("FIFO", Reason.INVALID_ARCHIVE, "is a FIFO", _tar(member(MEMBER, b"", type=b"6"), END)),
    Case("contiguous file", Reason.INVALID_ARCHIVE, "contiguous file", _tar(member(MEMBER, type=b"7"), END)),
    Case("GNU sparse file", Reason.INVALID_ARCHIVE, "GNU sparse file", _tar(member(MEMBER, type=b"S"), END)),
    Case("unknown type", Reason.INVALID_ARCHIVE, "unknown type", _tar(member(MEMBER, type=b"Z"), END)),
    # extension headers that rename or reshape the member
    Case("GNU long name renaming the member", Reason.INVALID_ARCHIVE, "GNU long-name header",
         _tar(member("././@LongLink", f"{MEMBER}\0".encode(), type=b"L", magic=b"ustar  \0"),
              member("evil", magic=b"ustar  \0"), END)),
    Case("pax path renaming a traversal to the member", Reason.INVALID_ARCHIVE, "sets 'path'",
         _tar(pax({"path": MEMBER}), member(f"../{MEMBER}"), END)),
    Case("pax path renaming the member away", Reason.INVALID_ARCHIVE, "sets 'path'",
         _tar(pax({"path": "../../usr/bin/evil"}), member(MEMBER), END)),
    Case("pax size override", Reason.INVALID_ARCHIVE, "sets 'size'",
         _tar(pax({"size": "10"}), member(MEMBER), END)),
    Case("pax GNU sparse map", Reason.INVALID_ARCHIVE, "GNU sparse file",
         _tar(pax({"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}), member(MEMBER), END)),
    Case("pax header without a member", Reason.INVALID_ARCHIVE, "not followed by a member",
         _tar(member(MEMBER), pax({"mtime": "1"}), END)),
    Case("malformed pax record", Reason.INVALID_ARCHIVE, "malformed pax",
         _tar(member("./PaxHeaders.0/x", b"99 mtime=1\n", type=b"x"), member(MEMBER), END)),
]
MALFORMED: dict[str, Case] = {c.name: c for c in _CASES}
