"""Offline assets: error messages, checksum verification, atomic and idempotent assembly.

Tests that need no real asset use a temporary `COALORA_HOME` and a tiny archive built on the spot;
`test_default_assets_fetch_is_a_noop` checks the real default assets (fetched by `make test`).
"""

import json
import re
import zipfile

import platformdirs
import pytest

from coalora import assets
from coalora.assets import Archive, Asset, AssetMissingError, ChecksumError


@pytest.fixture
def tmp_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("COALORA_HOME", str(home))
    return home


@pytest.fixture
def no_downloads(monkeypatch):
    """Make any attempt to download fail loudly: tests never touch the network."""

    def refuse(specs, sdist, dest):
        raise AssertionError(f"tests must not download {specs}; run `python -m coalora.assets fetch` first")

    monkeypatch.setattr(assets, "_pip_download", refuse)


def test_home_follows_env(tmp_home, monkeypatch):
    assert assets.home() == tmp_home
    monkeypatch.delenv("COALORA_HOME")
    assert str(assets.home()) == platformdirs.user_cache_dir("coalora")


def test_missing_asset_names_the_fetch_command(tmp_home):
    with pytest.raises(AssetMissingError, match=re.escape("python -m coalora.assets fetch")) as err:
        assets.path("minilm-l6")
    assert isinstance(err.value, FileNotFoundError)
    assert "make assets" in str(err.value)
    assert "--large" not in str(err.value)
    with pytest.raises(AssetMissingError, match=re.escape("python -m coalora.assets fetch --large")):
        assets.path("qwen2.5-coder-1.5b")


def test_unknown_asset_lists_valid_names():
    with pytest.raises(ValueError, match="no-such-model") as err:
        assets.path("no-such-model")
    for name in assets.ASSETS:
        assert name in str(err.value)


def test_registry_is_consistent():
    filenames = [a.filename for asset in assets.ASSETS.values() for a in asset.archives]
    assert len(filenames) == len(set(filenames)) == 1 + 1 + 1 + 1 + 5 + 22
    for asset in assets.ASSETS.values():
        for archive in asset.archives:
            assert re.fullmatch(r"[0-9a-f]{64}", archive.sha256)
            project, version = archive.spec.split("==")
            assert archive.filename.lower().startswith(f"{re.sub(r'[-_.]+', '_', project).lower()}-{version}")
    assert {name for name, a in assets.ASSETS.items() if a.large} == {"mpnet-base", "qwen2.5-coder-1.5b"}


def test_verify_mismatch_deletes_the_file(tmp_path):
    file = tmp_path / "fake-1.0-py3-none-any.whl"
    file.write_bytes(b"not what was pinned")
    actual = assets.sha256sum(file)
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as err:
        assets.verify(file, wrong)
    message = str(err.value)
    assert str(file) in message and wrong in message and actual in message
    assert not file.exists()


def _tiny_asset(tmp_path, name="tiny", sha256=None, build=None):
    """A one-file zip archive and an Asset whose build copies its member out."""
    archive = tmp_path / "tiny-1.0-py3-none-any.whl"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("tiny/data.txt", "hello")
    builds = []

    def copy_out(files, out, scratch):
        builds.append(files)
        assert not (out.parent.parent / name / assets.MANIFEST).exists()
        assets._extract_zip_folder(files[0], "tiny/", out)

    asset = Asset(
        name=name,
        description="a tiny test asset",
        origin="built by the test",
        licence="none",
        large=False,
        archives=(Archive("tiny==1.0", archive.name, sha256 or assets.sha256sum(archive)),),
        build=build or copy_out,
    )
    return asset, archive, builds


def test_fetch_asset_assembles_then_is_idempotent(tmp_home, tmp_path, no_downloads, caplog):
    asset, archive, builds = _tiny_asset(tmp_path)
    (tmp_home / "downloads").mkdir()
    archive.rename(tmp_home / "downloads" / archive.name)

    folder = assets.fetch_asset(asset)
    assert folder == tmp_home / "tiny"
    assert (folder / "data.txt").read_text() == "hello"
    manifest = json.loads((folder / assets.MANIFEST).read_text())
    assert manifest["name"] == "tiny" and manifest["origin"] == "built by the test"
    assert manifest["archives"][0]["sha256"] == asset.archives[0].sha256
    assert sorted(p.name for p in tmp_home.iterdir()) == ["downloads", "tiny"]  # no scratch left
    assert sorted(p.name for p in folder.iterdir()) == [assets.MANIFEST, "data.txt"]

    stamp = (folder / assets.MANIFEST).stat().st_mtime_ns
    with caplog.at_level("INFO", logger="coalora.assets"):
        assets.fetch_asset(asset)
    assert len(builds) == 1
    assert (folder / assets.MANIFEST).stat().st_mtime_ns == stamp
    assert "already present" in caplog.text


def test_interrupted_assembly_is_redone(tmp_home, tmp_path, no_downloads):
    def crash(files, out, scratch):
        (out / "half-written").write_text("x")
        raise RuntimeError("simulated crash during assembly")

    asset, archive, builds = _tiny_asset(tmp_path, build=crash)
    (tmp_home / "downloads").mkdir()
    archive.rename(tmp_home / "downloads" / archive.name)
    with pytest.raises(RuntimeError, match="simulated crash"):
        assets.fetch_asset(asset)
    assert not (tmp_home / "tiny").exists()

    (tmp_home / "tiny").mkdir()  # a folder renamed into place whose manifest was never written
    (tmp_home / "tiny" / "stale").write_text("x")
    fixed, _, builds = _tiny_asset(tmp_path)
    folder = assets.fetch_asset(fixed)
    assert len(builds) == 1
    assert sorted(p.name for p in folder.iterdir()) == [assets.MANIFEST, "data.txt"]
    assert sorted(p.name for p in tmp_home.iterdir()) == ["downloads", "tiny"]


def test_fetch_rejects_an_archive_with_the_wrong_hash(tmp_home, tmp_path, no_downloads):
    asset, archive, builds = _tiny_asset(tmp_path, sha256="f" * 64)
    (tmp_home / "downloads").mkdir()
    bad = tmp_home / "downloads" / archive.name
    archive.rename(bad)
    with pytest.raises(ChecksumError, match="f" * 64):
        assets.fetch_asset(asset)
    assert not bad.exists()
    assert builds == []
    assert not (tmp_home / "tiny").exists()


def test_list_command_runs(tmp_home, capsys):
    assets.main(["list"])
    out = capsys.readouterr().out
    for name in assets.ASSETS:
        assert re.search(rf"^{re.escape(name)}\s+missing", out, flags=re.M)


def test_default_assets_fetch_is_a_noop(no_downloads):
    """`make test` fetches the default assets first; fetching again must change nothing."""
    defaults = [name for name, asset in assets.ASSETS.items() if not asset.large]
    stamps = {name: (assets.path(name) / assets.MANIFEST).stat().st_mtime_ns for name in defaults}
    assets.fetch()
    assert stamps == {name: (assets.path(name) / assets.MANIFEST).stat().st_mtime_ns for name in defaults}
