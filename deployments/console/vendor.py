"""The console's third-party front-end files, fetched from the npm registry at build time.

The console's pages load scripts only from their own origin (their Content-Security-Policy
says `script-src 'self'`), so htmx and Chart.js are served from `static/vendor/`, never from
a CDN. This module puts them there: `python -m tokenmart.deployments.console.vendor`, run by
scripts/install.sh and the Docker images after tokenmart is installed. It needs neither node
nor npm: the registry is plain HTTPS. Each tarball is checked against the sha512 integrity
pinned below (the one the registry published for that version), and each extracted file
against its pinned sha256, so a changed registry answer fails the build instead of shipping.
A second run finds the files in place and downloads nothing.

Upgrading a package: change its version, then pin the new `dist.integrity` from
`<registry>/<name>/<version>` and the sha256 of the extracted file.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import os
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console

REGISTRY = "https://registry.npmjs.org"
STATIC_DIR = Path(__file__).resolve().parent / "static"
VENDOR_SUBDIR = "vendor"
TIMEOUT_S = 60.0


class VendorError(Exception):
    """A vendor file could not be fetched, verified or written; the message says which and why."""


@dataclass(frozen=True)
class VendorAsset:
    """One file taken from one pinned npm package version."""

    package: str
    version: str
    integrity: str  # the tarball's Subresource Integrity string, as the registry's dist.integrity
    member: str  # the file's path inside the tarball
    target: str  # its file name under static/vendor/
    sha256: str  # hex sha256 of the extracted file

    @property
    def spec(self) -> str:
        return f"{self.package}@{self.version}"


ASSETS: tuple[VendorAsset, ...] = (
    VendorAsset(
        package="htmx.org",
        version="2.0.11",
        integrity="sha512-Thx/WtpeOQqSrqBCw/A1cwGJGg4UrVa3+sW0GmrM3p4gJgO89ecH4qtbnyzDDWFvBTqjnIMCgELTNt636dtamA==",
        member="package/dist/htmx.min.js",
        target="htmx.min.js",
        sha256="d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717",
    ),
    VendorAsset(
        package="chart.js",
        version="4.6.1",
        integrity="sha512-hJyniucsFmq//EvXYvJ6c6mahPoI3kaxdjVH8awTaJ/fDNWeSqqqArixMJWkWNN6fcYvPU3HneSANFNYtRi61g==",
        member="package/dist/chart.umd.min.js",
        target="chart.umd.min.js",
        sha256="87364cc2b2a76a6684929e7d6b80b18a897794db38400caff1fcf1791c6925d2",
    ),
)


def vendor_dir(static_dir: Path | None = None) -> Path:
    return (static_dir or STATIC_DIR) / VENDOR_SUBDIR


def _sha256_of(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def missing_assets(static_dir: Path | None = None) -> list[str]:
    """The vendor files, as paths under the static folder ("vendor/htmx.min.js"), that are absent
    or differ from their pinned sha256. Empty when the console's pages will find every script.

    The app calls it at startup: a console without its scripts still serves pages, whose charts
    and buttons then do nothing, so the cause must be in the log.
    """
    folder = vendor_dir(static_dir)
    return [f"{VENDOR_SUBDIR}/{asset.target}" for asset in ASSETS if _sha256_of(folder / asset.target) != asset.sha256]


def verify_integrity(data: bytes, integrity: str) -> None:
    """Raise VendorError unless `data` matches the sha512 of an SRI string ("sha512-<base64>").

    An SRI string may list several hashes separated by spaces; one matching sha512 is enough.
    Only sha512 is accepted: it is what the registry publishes for every current package.
    """
    expected = [token[len("sha512-") :] for token in integrity.split() if token.startswith("sha512-")]
    if not expected:
        raise VendorError(f"integrity {integrity!r} has no sha512 hash")
    actual = base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")
    if actual not in expected:
        raise VendorError(f"sha512 mismatch: expected {integrity}, got sha512-{actual}")


def extract_member(tarball: bytes, member: str) -> bytes:
    """One regular file's bytes from a gzipped tarball, read in memory (nothing else is unpacked)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
            info = archive.getmember(member)
            if not info.isfile():
                raise VendorError(f"{member} in the tarball is not a regular file")
            handle = archive.extractfile(info)
            if handle is None:
                raise VendorError(f"{member} in the tarball cannot be read")
            return handle.read()
    except KeyError:
        raise VendorError(f"{member} is not in the tarball") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise VendorError(f"the tarball cannot be read: {exc}") from exc


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`: a reader (or a
    build interrupted half-way) sees the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        # mkstemp creates 0600; the images write as root files that the pod's user serves.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch_tarball(client: httpx.Client, asset: VendorAsset, registry: str = REGISTRY) -> bytes:
    """The package's tarball, checked against the pinned integrity."""
    meta_url = f"{registry.rstrip('/')}/{asset.package}/{asset.version}"
    try:
        meta = client.get(meta_url)
        meta.raise_for_status()
        dist = meta.json()["dist"]
        tarball_url, published = dist["tarball"], dist.get("integrity")
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        raise VendorError(f"cannot read {meta_url}: {exc}") from exc
    if published is not None and published != asset.integrity:
        raise VendorError(f"the registry now publishes integrity {published}, not the pinned {asset.integrity}")
    try:
        response = client.get(tarball_url)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise VendorError(f"cannot download {tarball_url}: {exc}") from exc
    verify_integrity(response.content, asset.integrity)
    return response.content


def install_asset(client: httpx.Client, asset: VendorAsset, folder: Path, registry: str = REGISTRY) -> bool:
    """Put one file in place; False when it was already there with its pinned sha256."""
    target = folder / asset.target
    if _sha256_of(target) == asset.sha256:
        return False
    data = extract_member(fetch_tarball(client, asset, registry), asset.member)
    actual = hashlib.sha256(data).hexdigest()
    if actual != asset.sha256:
        raise VendorError(f"{asset.member} has sha256 {actual}, not the pinned {asset.sha256}")
    write_atomically(target, data)
    return True


def vendor(static_dir: Path | None = None, registry: str = REGISTRY, console: Console | None = None) -> None:
    """Fetch every missing or changed vendor file; raise VendorError at the first failure."""
    console = console or Console()
    folder = vendor_dir(static_dir)
    with httpx.Client(timeout=TIMEOUT_S, follow_redirects=True) as client:
        for asset in ASSETS:
            try:
                fetched = install_asset(client, asset, folder, registry)
            except VendorError as exc:
                raise VendorError(f"{asset.spec} ({asset.target}): {exc}") from exc
            size = (folder / asset.target).stat().st_size
            state = "fetched" if fetched else "present"
            console.print(
                f"{state:<8} {VENDOR_SUBDIR}/{asset.target:<18} {asset.spec:<16} {size:>9,} bytes"
                f"  sha256 {asset.sha256[:12]}",
                highlight=False,
                soft_wrap=True,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokenmart.deployments.console.vendor",
        description="Fetch the console's pinned front-end files (htmx, Chart.js) from the npm registry.",
    )
    parser.add_argument("--registry", default=REGISTRY, help=f"npm registry base URL (default {REGISTRY})")
    parser.add_argument(
        "--static-dir", type=Path, default=STATIC_DIR, help="the console's static folder; files go to its vendor/"
    )
    args = parser.parse_args(argv)
    try:
        vendor(args.static_dir, args.registry)
    except (VendorError, OSError) as exc:
        print(f"console vendor files: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
