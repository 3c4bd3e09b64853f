#!/usr/bin/python3
"""Build the release: the `unbounded-agent` zipapp and the tarball that carries it.

    build_release.py --version 1.2.3 --out dist/

writes dist/unbounded-agent (the executable zipapp, also used by the Debian package) and
dist/unbounded-agent-linux-amd64.tar.gz (exactly one member, `unbounded-agent`). The zipapp holds
the pure-Python library with the version stamped in; C extensions (pystemd) come from the
distribution's packages, so it runs with the system python3.
"""

import argparse
import gzip
import io
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lib" / "unbounded_agent"
TARBALL = "unbounded-agent-linux-amd64.tar.gz"
MEMBER = "unbounded-agent"
# -I: a root daemon must not pick up modules from PYTHONPATH, the user site or the working directory.
INTERPRETER = "/usr/bin/python3 -I"
ZIP_EPOCH = 315532800  # 1980-01-01, the earliest time a zip member can carry
VERSION_RE = re.compile(r"^[0-9][0-9A-Za-z.+~-]*$")  # also a valid Debian upstream version


def stage_package(dest: Path, version: str) -> None:
    """Copy the library into dest/unbounded_agent with the version stamped in."""
    shutil.copytree(PACKAGE, dest / "unbounded_agent", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "_stamp.py"))
    (dest / "unbounded_agent" / "_stamp.py").write_text(f'VERSION = "{version}"\n')


def compile_bytecode(tree: Path) -> None:
    """Bytecode beside each module of tree, for the python3 that builds (Debian 12's, for a release). Python cannot
    cache what it compiles from a zip, so without it every run of the agent compiled every module it imported
    (the daemon's start paid 40 ms of CPU for it). Unchecked hash-based .pyc files: reproducible, and always
    from the same build as the sources beside them; another Python version ignores them and compiles the
    sources as before."""
    import py_compile

    for src in sorted(tree.rglob("*.py")):
        if src.name != "__main__.py":
            py_compile.compile(str(src), cfile=str(src.with_suffix(".pyc")), dfile=src.relative_to(tree).as_posix(),
                               doraise=True, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)


# zipapp's own generated __main__ ignores main()'s return value: every command would exit 0.
MAIN = "import sys\n\nfrom unbounded_agent.cli import main\n\nsys.exit(main())\n"


def build_zipapp(version: str, target: Path) -> None:
    """An executable zip (what zipapp writes), reproducible: members in name order with one timestamp,
    so every build of a version is the same file and the .deb and the .rpm carry the same agent."""
    when = time.gmtime(max(int(os.environ.get("SOURCE_DATE_EPOCH", "0")), ZIP_EPOCH))[:6]
    with tempfile.TemporaryDirectory() as tmp:
        stage_package(Path(tmp), version)
        (Path(tmp) / "__main__.py").write_text(MAIN)
        compile_bytecode(Path(tmp))
        with open(target, "wb") as f:
            f.write(b"#!" + INTERPRETER.encode() + b"\n")
            with zipfile.ZipFile(f, "w") as z:
                for path in sorted(Path(tmp).rglob("*")):
                    if path.is_file():
                        info = zipfile.ZipInfo(path.relative_to(tmp).as_posix(), date_time=when)
                        info.compress_type = zipfile.ZIP_DEFLATED
                        info.external_attr = 0o644 << 16
                        z.writestr(info, path.read_bytes())
    target.chmod(0o755)


def build_tarball(zipapp_path: Path, target: Path) -> None:
    data = zipapp_path.read_bytes()
    info = tarfile.TarInfo(MEMBER)
    info.size = len(data)
    info.mode = 0o755
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data))
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=info.mtime, filename="") as gz:
        gz.write(raw.getvalue())
    tmp.replace(target)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--stage-only", type=Path, help="only stage the stamped library into this directory (for the .deb)")
    args = ap.parse_args()
    if not VERSION_RE.match(args.version):
        print(f"build_release: invalid version {args.version!r}: must start with a digit and use only [0-9A-Za-z.+~-]", file=sys.stderr)
        return 2
    if args.stage_only:
        stage_package(args.stage_only, args.version)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    app = args.out / MEMBER
    build_zipapp(args.version, app)
    build_tarball(app, args.out / TARBALL)
    print(f"built {args.out / TARBALL} (unbounded-agent {args.version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
