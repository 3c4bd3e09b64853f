"""The release archive must hold exactly one regular file, `unbounded-agent`, and nothing that other tools
could read differently; whatever is refused leaves the destination directory as it was."""

import hashlib
import os
import stat
import tarfile

import pytest
from archives import AGENT, END, MALFORMED, MEMBER, VALID, header, member, pad, valid_archive, write_gz

from unbounded_agent import archive
from unbounded_agent.reasons import OpsError, Reason

# Small bounds keep the gzip bombs small: the checks are the same at 256 MiB.
MAX = 64 * 1024
SLOT = "unbounded-agent-blue"  # extraction happens in the bin dir, beside the slots


@pytest.fixture
def bin_dir(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    (d / SLOT).write_bytes(b"the running agent")
    return d


def listing(d):
    return sorted(p.name for p in d.iterdir())


@pytest.mark.parametrize("case", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_archive_is_refused_and_leaves_nothing_behind(case, tmp_path, bin_dir):
    path = case(tmp_path / "agent.tar.gz", MAX)
    with pytest.raises(OpsError) as e:
        archive.extract_agent(path, bin_dir, max_extracted_bytes=MAX)
    assert e.value.reason == case.reason
    assert case.message in e.value.message
    assert listing(bin_dir) == [SLOT]
    assert (bin_dir / SLOT).read_bytes() == b"the running agent"


@pytest.mark.parametrize("build", VALID.values(), ids=VALID.keys())
def test_valid_archive_yields_an_executable_hidden_temp_file(build, tmp_path, bin_dir):
    path = build(tmp_path / "agent.tar.gz", AGENT)
    staged = archive.extract_agent(path, bin_dir, max_extracted_bytes=MAX)
    assert staged.parent == bin_dir
    assert staged.name.startswith(f".{MEMBER}.tmp-")  # fsutil.remove_stale_temps sweeps it after a crash
    assert staged.read_bytes() == AGENT
    # 0755 whatever the archive said: no setuid/setgid/sticky, and executable even from a 0644 member.
    assert stat.S_IMODE(staged.stat().st_mode) == 0o755
    assert listing(bin_dir) == sorted([SLOT, staged.name])


def test_large_member_streams_across_many_reads(tmp_path, bin_dir):
    # 5 MiB of random bytes crosses every internal buffer boundary many times; the content must survive.
    content = os.urandom(5 * 1024 * 1024 + 123)
    path = valid_archive(tmp_path / "agent.tar.gz", content)
    staged = archive.extract_agent(path, bin_dir, max_extracted_bytes=len(content))
    assert hashlib.sha256(staged.read_bytes()).digest() == hashlib.sha256(content).digest()


def test_member_of_exactly_the_bound_is_accepted(tmp_path, bin_dir):
    content = b"x" * MAX
    staged = archive.extract_agent(valid_archive(tmp_path / "a.tgz", content), bin_dir, max_extracted_bytes=MAX)
    assert staged.stat().st_size == MAX


def test_each_call_stages_a_new_file(tmp_path, bin_dir):
    # Two stagings never share a temp name, so a leftover of one cannot be mistaken for the other.
    path = valid_archive(tmp_path / "a.tgz", AGENT)
    first = archive.extract_agent(path, bin_dir, max_extracted_bytes=MAX)
    second = archive.extract_agent(path, bin_dir, max_extracted_bytes=MAX)
    assert first != second and first.exists() and second.exists()


def test_python_tarfile_would_have_accepted_what_we_refuse(tmp_path):
    # Why the reader is ours: tarfile applies a pax path silently and stops at the first zero block.
    path = MALFORMED["pax path renaming a traversal to the member"](tmp_path / "a.tgz")
    with tarfile.open(path, "r|gz") as tar:
        assert [m.name for m in tar] == [MEMBER]
    path = MALFORMED["member hidden after a zero block (tar -i)"](tmp_path / "b.tgz")
    with tarfile.open(path, "r|gz") as tar:
        assert [m.name for m in tar] == [MEMBER]


def test_missing_archive_is_an_execution_failure(tmp_path, bin_dir):
    with pytest.raises(OpsError) as e:
        archive.extract_agent(tmp_path / "absent.tar.gz", bin_dir, max_extracted_bytes=MAX)
    assert e.value.reason == Reason.EXECUTION_FAILED
    assert "absent.tar.gz" in e.value.message
    assert listing(bin_dir) == [SLOT]


def test_unreadable_archive_is_an_execution_failure(tmp_path, bin_dir):
    # /proc/self/mem opens, and reading its offset 0 (never mapped) fails with EIO: a real read error,
    # which is an I/O failure, not an invalid archive.
    with pytest.raises(OpsError) as e:
        archive.extract_agent("/proc/self/mem", bin_dir, max_extracted_bytes=MAX)
    assert e.value.reason == Reason.EXECUTION_FAILED
    assert "cannot read the archive" in e.value.message
    assert listing(bin_dir) == [SLOT]


def test_missing_destination_directory_is_an_execution_failure(tmp_path):
    path = valid_archive(tmp_path / "a.tgz", AGENT)
    with pytest.raises(OpsError) as e:
        archive.extract_agent(path, tmp_path / "no-such-dir", max_extracted_bytes=MAX)
    assert e.value.reason == Reason.EXECUTION_FAILED
    assert "no-such-dir" in e.value.message


def test_failure_after_the_member_was_written_removes_it(tmp_path, bin_dir):
    # The whole member is written before the duplicate is seen: the temp file must still go.
    big = os.urandom(3 * 1024 * 1024)
    path = write_gz(tmp_path / "a.tgz", member(MEMBER, big), member(MEMBER, AGENT), END)
    with pytest.raises(OpsError, match="duplicate member"):
        archive.extract_agent(path, bin_dir, max_extracted_bytes=len(big))
    assert listing(bin_dir) == [SLOT]


def test_gnu_base256_size_is_read(tmp_path, bin_dir):
    # GNU tar writes sizes of 8 GiB and more in base-256; the same encoding must work for small ones.
    size_field = b"\x80" + len(AGENT).to_bytes(11, "big")
    path = write_gz(tmp_path / "a.tgz", header(MEMBER, size_field=size_field) + pad(AGENT), END)
    assert archive.extract_agent(path, bin_dir, max_extracted_bytes=MAX).read_bytes() == AGENT


def test_tar_padding_up_to_the_bound_is_not_a_bomb(tmp_path, bin_dir):
    # Record padding is legitimate: zeros after the member are accepted up to twice MAX in all.
    content = b"y" * (MAX // 2)
    total_zeros = 2 * MAX - 512 - len(content)  # header block + data + zeros == the cap exactly
    path = write_gz(tmp_path / "a.tgz", member(MEMBER, content), bytes(total_zeros))
    assert archive.extract_agent(path, bin_dir, max_extracted_bytes=MAX).read_bytes() == content
