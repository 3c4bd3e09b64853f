#!/usr/bin/env python3
"""Benchmark of the download-stage work: download() then extract_agent(), for 50 MB and 500 MB archives.

    python bench/bench_stage.py [--sizes 50,500] [--dir /var/tmp/unbounded-agent-bench] [--keep]

Builds valid release archives whose member is random bytes (incompressible, so the archive really is
50 / 500 MB), serves them over local HTTPS with a throwaway CA made by openssl, and runs each stage in a
fresh child process. Reports wall times and the child's peak RSS (VmHWM): streaming means the peak must
not grow with the archive size. Prints a table; asserts nothing (timings depend on the machine).
"""

import argparse
import functools
import hashlib
import http.server
import json
import os
import random
import resource
import shutil
import ssl
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MB = 1000 * 1000
MEMBER = "unbounded-agent"


# --- archives ----------------------------------------------------------------------------------------


def build_archive(path: Path, size: int) -> str:
    """A release archive of about ``size`` bytes holding ``size`` random bytes; returns the member's sha256.

    Written in pieces through zlib at level 1 (random data does not compress anyway), so building the
    500 MB archive does not need 500 MB of memory either.
    """
    info = tarfile.TarInfo(MEMBER)
    info.size, info.mode, info.uname, info.gname = size, 0o755, "root", "root"
    rng = random.Random(size)  # the same archive for the same size, from run to run
    member_digest = hashlib.sha256()
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        gz = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        f.write(gz.compress(info.tobuf(format=tarfile.GNU_FORMAT)))
        left = size
        while left:
            piece = rng.randbytes(min(left, 4 << 20))
            member_digest.update(piece)
            f.write(gz.compress(piece))
            left -= len(piece)
        f.write(gz.compress(bytes(-size % 512 + 1024)))  # block padding and the end-of-archive marker
        f.write(gz.flush())
    tmp.rename(path)
    path.with_suffix(".sha256").write_text(member_digest.hexdigest())
    return member_digest.hexdigest()


def archive_for(directory: Path, size_mb: int) -> tuple[Path, str]:
    path = directory / f"agent-{size_mb}MB.tar.gz"
    digest_file = path.with_suffix(".sha256")
    if path.exists() and digest_file.exists():
        return path, digest_file.read_text().strip()
    print(f"building {path} ...", file=sys.stderr, flush=True)
    return path, build_archive(path, size_mb * MB)


# --- HTTPS -------------------------------------------------------------------------------------------


def make_pki(d: Path) -> tuple[str, str, str]:
    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=bench-ca",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    (d / "ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "1", "-extfile", "ext")
    return str(d / "ca.crt"), str(d / "server.crt"), str(d / "server.key")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(directory: Path, cert: str, key: str) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# --- the measured child ------------------------------------------------------------------------------


def vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(args) -> None:
    """Runs in a fresh process, as the download-stage executable would; prints one JSON line."""
    sys.path.insert(0, str(REPO / "lib"))
    from unbounded_agent import archive, download, fsutil

    result = {}
    if args.url:
        work = Path(args.work)
        limits = download.Limits(max_archive_bytes=2 << 30, connect_timeout=10, read_timeout=30,
                                 deadline_seconds=600, allow_http=False)
        fsutil.check_free_space(work, 3 * args.size)
        start = time.monotonic()
        with open(work / "download.tar.gz", "wb") as f:
            result["archive_sha256"] = download.download(args.url, f, limits=limits, ca_bundle=args.ca)
            f.flush()
            os.fsync(f.fileno())
        result["download_s"] = time.monotonic() - start
        start = time.monotonic()
        staged = archive.extract_agent(work / "download.tar.gz", work, max_extracted_bytes=2 << 30)
        result["extract_s"] = time.monotonic() - start
        result["peak_rss_kib"] = vm_hwm_kib()  # before hashing below, which is not part of the stage
        digest = hashlib.sha256()
        with open(staged, "rb") as f:
            while piece := f.read(1 << 20):
                digest.update(piece)
        result["member_sha256"] = digest.hexdigest()
    else:  # baseline: the same imports, no work
        import requests  # noqa: F401  (download imports it lazily; count it in the floor)

        result["peak_rss_kib"] = vm_hwm_kib()
    print(json.dumps(result))


def run_child(*extra: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *extra], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def stage_rows(sizes: list[int], directory: Path, keep: bool = False, runs: int = 1) -> list[tuple]:
    """(name, download s, extract s, total s, peak RSS KiB, member check) per size, medians over runs; the
    first row is the import-only floor."""
    serve_dir = directory / "serve"
    serve_dir.mkdir(parents=True, exist_ok=True)
    archives = {size: archive_for(serve_dir, size) for size in sizes}
    rows = []
    with tempfile.TemporaryDirectory(prefix="pki-", dir=directory) as pki:
        ca, cert, key = make_pki(Path(pki))
        server = serve(serve_dir, cert, key)
        try:
            floor = [run_child()["peak_rss_kib"] for _ in range(runs)]
            rows.append(("imports only", "-", "-", "-", statistics.median(floor), "", floor))
            for size in sizes:
                path, member_sha = archives[size]
                results = []
                for _ in range(runs):
                    work = Path(tempfile.mkdtemp(prefix="stage-", dir=directory))
                    try:
                        url = f"https://localhost:{server.server_address[1]}/{path.name}"
                        results.append(run_child("--url", url, "--ca", ca, "--work", str(work), "--size", str(size * MB)))
                    finally:
                        shutil.rmtree(work)
                ok = "ok" if all(r["member_sha256"] == member_sha for r in results) else "CONTENT MISMATCH"
                dl = statistics.median(r["download_s"] for r in results)
                ex = statistics.median(r["extract_s"] for r in results)
                peaks = [r["peak_rss_kib"] for r in results]
                rows.append((f"{path.stat().st_size / MB:.0f} MB archive", f"{dl:.2f}", f"{ex:.2f}", f"{dl + ex:.2f}",
                             statistics.median(peaks), ok, peaks))
        finally:
            server.shutdown()
    if not keep:
        shutil.rmtree(serve_dir)
        try:
            directory.rmdir()
        except OSError:
            pass  # holds something of the user's: leave it
    return rows


# --- main --------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="50,500", help="archive sizes in MB, comma-separated")
    ap.add_argument("--dir", default="/var/tmp/unbounded-agent-bench", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the built archives for the next run")
    ap.add_argument("--runs", type=int, default=1, help="runs per size (medians are shown)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--ca", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    rows = stage_rows(sizes, args.dir, args.keep, runs=args.runs)
    print(f"{'':<18}{'download s':>11}{'extract s':>11}{'total s':>9}{'peak RSS MiB':>14}  member")
    for name, dl, ex, total, rss, ok, _ in rows:
        print(f"{name:<18}{dl:>11}{ex:>11}{total:>9}{rss / 1024:>14.1f}  {ok}")
    peaks = [r[4] for r in rows[1:]]
    if len(peaks) > 1:
        print(f"peak RSS spread across sizes: {(max(peaks) - min(peaks)) / 1024:.1f} MiB "
              f"(above the import-only floor: {(max(peaks) - rows[0][4]) / 1024:.1f} MiB)")
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"children's ru_maxrss (largest child): {largest / 1024:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
