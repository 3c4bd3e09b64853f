"""The .rpm carries the .deb's files: path by path, the same type, mode, link target and content, except
where packaging/README.md's table of differences says otherwise; and it depends on the same packages
under their RHEL/Fedora names."""

from __future__ import annotations

import gzip
import io
import re
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

NONE = "—"


@dataclass(frozen=True)
class Entry:
    kind: str  # "file", "link" or "dir"
    mode: int
    data: bytes  # a file's content (uncompressed when gzipped), a link's target


@dataclass(frozen=True)
class Difference:
    deb: str | None
    rpm: str | None
    same_content: bool


def payload(tar: tarfile.TarFile) -> dict[str, Entry]:
    out = {}
    for m in tar.getmembers():
        path = "/" + m.name.removeprefix("./").rstrip("/")
        if m.isdir():
            out[path] = Entry("dir", m.mode & 0o7777, b"")
        elif m.issym():
            out[path] = Entry("link", 0, m.linkname.encode())
        else:
            data = tar.extractfile(m).read()
            out[path] = Entry("file", m.mode & 0o7777, gzip.decompress(data) if path.endswith(".gz") else data)
    return out


def deb_payload(deb: Path) -> dict[str, Entry]:
    raw = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return payload(tar)


def rpm_payload(rpm: Path) -> dict[str, Entry]:
    with open(rpm, "rb") as f:
        raw = subprocess.run(["rpm2archive", "-"], stdin=f, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return payload(tar)


def rpm_python_version(rpm: Path) -> str:
    requires = subprocess.run(["rpm", "-qp", "--requires", str(rpm)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"^python\(abi\) = (\d+\.\d+)$", requires, re.M)
    assert m, f"no python(abi) requirement in:\n{requires}"
    return m[1]


def documented_differences(readme: Path, python_version: str) -> list[Difference]:
    """The rows of packaging/README.md's table: `.deb` | `.rpm` | content | why."""
    text = readme.read_text()
    section = text[text.index("### Where the .rpm's files differ from the .deb's"):]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not (cells[0].startswith("`") or cells[0] == NONE):
            continue
        deb, rpm = (None if c == NONE else c.strip("`").replace("python3.X", f"python{python_version}") for c in cells[:2])
        rows.append(Difference(deb, rpm, cells[2] == "same"))
    return rows


def expected_rpm_path(deb_path: str, differences: list[Difference]) -> str | None:
    """Where a .deb path lands in the .rpm (None: not shipped): a row names the file or a directory prefix."""
    for d in differences:
        if d.deb is None:
            continue
        if deb_path == d.deb or (d.deb.endswith("/") and deb_path.startswith(d.deb)):
            return None if d.rpm is None else d.rpm + deb_path[len(d.deb):]
    return deb_path


@pytest.fixture(scope="module")
def packages(deb_path, rpm_path, repo_root):
    differences = documented_differences(repo_root / "packaging" / "README.md", rpm_python_version(rpm_path))
    deb = {p: e for p, e in deb_payload(deb_path).items() if e.kind != "dir"}
    rpm = {p: e for p, e in rpm_payload(rpm_path).items() if e.kind != "dir"}
    return deb, rpm, differences


def test_the_documented_differences_are_read(packages):
    _, _, differences = packages
    assert len(differences) == 7
    assert Difference("/lib/systemd/system/", "/usr/lib/systemd/system/", True) in differences


def test_every_file_of_the_deb_is_in_the_rpm_where_documented_and_nothing_else_is(packages):
    deb, rpm, differences = packages
    mapped = {expected_rpm_path(p, differences) for p in deb} - {None}
    rpm_only = {d.rpm for d in differences if d.deb is None}
    assert sorted(set(rpm) - mapped - rpm_only) == []
    assert sorted(mapped - set(rpm)) == []
    assert rpm_only <= set(rpm)
    # the payload is the whole toolset, not an empty pair of archives that trivially match
    assert len(rpm) > 90 and "/usr/libexec/unbounded-agent/unbounded-agent-seed-slots" in rpm


def test_each_file_has_the_same_type_mode_and_content(packages):
    deb, rpm, differences = packages
    differing = {d.rpm for d in differences if not d.same_content}
    mismatches = []
    for path, entry in sorted(deb.items()):
        target = expected_rpm_path(path, differences)
        if target is None:
            continue
        other = rpm[target]
        if target in differing:
            if (other.kind, other.mode) != (entry.kind, entry.mode):
                mismatches.append(f"{path} ({entry.kind} {entry.mode:o}) vs {target} ({other.kind} {other.mode:o})")
        elif other != entry:
            what = "content" if (other.kind, other.mode) == (entry.kind, entry.mode) else f"{entry.kind} {entry.mode:o} vs {other.kind} {other.mode:o}"
            mismatches.append(f"{path} vs {target}: {what}")
    assert mismatches == []


def test_the_library_and_the_packaged_agent_carry_the_stamped_version(packages, version):
    _, rpm, _ = packages
    stamp = next(e for p, e in rpm.items() if p.endswith("/site-packages/unbounded_agent/_stamp.py"))
    assert stamp.data == f'VERSION = "{version}"\n'.encode()
    assert rpm["/usr/bin/unbounded-agent"] == Entry("link", 0, b"../libexec/unbounded-agent/unbounded-agent-launcher")
    assert rpm["/usr/lib/unbounded-agent/unbounded-agent"].mode == 0o755


def test_the_rpm_ships_the_license_text(packages):
    _, rpm, _ = packages
    assert b"Apache License" in rpm["/usr/share/licenses/unbounded-agent/LICENSE"].data


# Debian's name -> the RHEL/Fedora family's, where they differ.
FEDORA_NAMES = {"python3-yaml": "python3-pyyaml"}


def test_the_rpm_requires_what_the_deb_depends_on(deb_path, rpm_path):
    depends = subprocess.run(["dpkg-deb", "-f", str(deb_path), "Depends"], capture_output=True, text=True, check=True).stdout
    deb_names = {d.strip().split()[0] for d in depends.split(",")} - {"python3:any", "python3"}
    requires = subprocess.run(["rpm", "-qp", "--requires", str(rpm_path)], capture_output=True, text=True, check=True).stdout
    rpm_names = {line.split()[0] for line in requires.splitlines()}
    assert {FEDORA_NAMES.get(n, n) for n in deb_names} <= rpm_names
    assert {"python3-pystemd", "python3-pyroute2", "python3-requests", "python3-kubernetes", "python3-pyyaml",
            "systemd"} <= rpm_names
