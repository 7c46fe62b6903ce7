"""The console's static assets: the vendored scripts are verified against pinned hashes before
they are written, a missing one is reported, and our own JS and CSS load nothing from another
origin (the pages' CSP would refuse it) and evaluate no strings as code."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import httpx
import pytest

from tokenmart.deployments.console import vendor
from tokenmart.deployments.console.vendor import (
    ASSETS,
    VendorAsset,
    VendorError,
    extract_member,
    install_asset,
    missing_assets,
    verify_integrity,
)

STATIC = Path(vendor.__file__).resolve().parent / "static"


def _tarball(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


SCRIPT = b"var demo=function(){return 1}();\n"
TARBALL = _tarball({"package/package.json": b"{}", "package/dist/demo.min.js": SCRIPT})
DEMO = VendorAsset(
    package="demo-pkg",
    version="1.2.3",
    integrity=_integrity(TARBALL),
    member="package/dist/demo.min.js",
    target="demo.min.js",
    sha256=hashlib.sha256(SCRIPT).hexdigest(),
)


def test_a_tarball_matching_its_integrity_passes_and_yields_the_member() -> None:
    verify_integrity(TARBALL, DEMO.integrity)
    assert extract_member(TARBALL, "package/dist/demo.min.js") == SCRIPT


def test_one_changed_byte_fails_the_integrity_check() -> None:
    changed = bytearray(TARBALL)
    changed[-1] ^= 0x01
    with pytest.raises(VendorError, match="sha512 mismatch"):
        verify_integrity(bytes(changed), DEMO.integrity)


def test_an_integrity_list_passes_when_one_sha512_matches_and_other_algorithms_are_refused() -> None:
    verify_integrity(TARBALL, f"sha512-{'A' * 86}== {DEMO.integrity}")
    sha1 = "sha1-" + base64.b64encode(hashlib.sha1(TARBALL).digest()).decode()
    with pytest.raises(VendorError, match="no sha512"):
        verify_integrity(TARBALL, sha1)


def test_a_member_absent_from_the_tarball_is_named() -> None:
    with pytest.raises(VendorError, match=re.escape("package/dist/other.js is not in the tarball")):
        extract_member(TARBALL, "package/dist/other.js")


def test_the_pins_are_well_formed_sha512_and_sha256() -> None:
    assert [asset.target for asset in ASSETS] == ["htmx.min.js", "chart.umd.min.js"]
    for asset in ASSETS:
        assert asset.integrity.startswith("sha512-")
        assert len(base64.b64decode(asset.integrity.removeprefix("sha512-"), validate=True)) == 64
        assert re.fullmatch(r"[0-9a-f]{64}", asset.sha256)


@pytest.mark.parametrize("asset", ASSETS, ids=lambda asset: asset.target)
def test_a_vendored_file_in_the_package_matches_its_pinned_sha256(asset: VendorAsset) -> None:
    path = STATIC / "vendor" / asset.target
    if not path.exists():
        pytest.skip(f"{path} not fetched here (python -m tokenmart.deployments.console.vendor)")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == asset.sha256


def test_missing_assets_names_each_absent_or_changed_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert missing_assets(tmp_path) == ["vendor/htmx.min.js", "vendor/chart.umd.min.js"]

    monkeypatch.setattr(vendor, "ASSETS", (DEMO,))
    assert missing_assets(tmp_path) == ["vendor/demo.min.js"]
    (tmp_path / "vendor").mkdir()
    (tmp_path / "vendor" / "demo.min.js").write_bytes(SCRIPT + b"// changed\n")
    assert missing_assets(tmp_path) == ["vendor/demo.min.js"]
    (tmp_path / "vendor" / "demo.min.js").write_bytes(SCRIPT)
    assert missing_assets(tmp_path) == []


def _registry(tarball: bytes, integrity: str, seen: list[str]) -> httpx.Client:
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/demo-pkg/1.2.3":
            dist = {"tarball": "https://registry.test/demo-pkg/-/demo-pkg-1.2.3.tgz", "integrity": integrity}
            return httpx.Response(200, content=json.dumps({"dist": dist}))
        if request.url.path == "/demo-pkg/-/demo-pkg-1.2.3.tgz":
            return httpx.Response(200, content=tarball)
        return httpx.Response(404)

    return httpx.Client(transport=httpx.MockTransport(answer))


def test_install_writes_the_verified_file_once_and_then_downloads_nothing(tmp_path: Path) -> None:
    seen: list[str] = []
    with _registry(TARBALL, DEMO.integrity, seen) as client:
        assert install_asset(client, DEMO, tmp_path, "https://registry.test") is True
        assert (tmp_path / "demo.min.js").read_bytes() == SCRIPT
        assert (tmp_path / "demo.min.js").stat().st_mode & 0o777 == 0o644
        assert seen == ["/demo-pkg/1.2.3", "/demo-pkg/-/demo-pkg-1.2.3.tgz"]
        assert install_asset(client, DEMO, tmp_path, "https://registry.test") is False
    assert len(seen) == 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["demo.min.js"]


def test_a_tarball_that_fails_its_pin_writes_nothing(tmp_path: Path) -> None:
    tampered = _tarball({"package/dist/demo.min.js": b"alert(1)\n"})
    with _registry(tampered, DEMO.integrity, []) as client, pytest.raises(VendorError, match="sha512 mismatch"):
        install_asset(client, DEMO, tmp_path, "https://registry.test")
    assert not (tmp_path / "demo.min.js").exists()


def test_a_registry_publishing_another_integrity_fails_before_downloading(tmp_path: Path) -> None:
    seen: list[str] = []
    other = _integrity(b"another tarball")
    with _registry(TARBALL, other, seen) as client, pytest.raises(VendorError, match="now publishes integrity"):
        install_asset(client, DEMO, tmp_path, "https://registry.test")
    assert seen == ["/demo-pkg/1.2.3"]


def test_the_command_exits_non_zero_with_the_reason_when_the_registry_is_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert vendor.main(["--registry", "http://127.0.0.1:1", "--static-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("console vendor files: htmx.org@2.0.11 (htmx.min.js): cannot read http://127.0.0.1:1/")
    assert not (tmp_path / "vendor" / "htmx.min.js").exists()


@pytest.mark.parametrize("name", ["console.js", "console.css"])
def test_our_assets_load_nothing_from_another_origin(name: str) -> None:
    text = (STATIC / name).read_text()
    assert "http://" not in text
    assert "https://" not in text
    assert "@import" not in text


def test_console_js_evaluates_no_strings_as_code() -> None:
    text = (STATIC / "console.js").read_text()
    assert "eval(" not in text
    assert "new Function(" not in text
    assert not re.search(r"set(Timeout|Interval)\(\s*[\"'`]", text)
    assert len(text.splitlines()) < 150
