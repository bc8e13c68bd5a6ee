"""The built-in multi-domain corpus, assembled offline from Debian packages.

``build_corpus()`` fetches the packages with ``apt-get download`` (no root install: the
``.deb`` files are unpacked with ``dpkg-deb -x`` into the cache), cleans the markup and writes
deterministic train / calib / heldout splits per domain as jsonl files of
``{"id": ..., "text": ...}`` documents::

    $MOEPRESS_CACHE/corpus/v1/<domain>/{train,calib,heldout}.jsonl
    $MOEPRESS_CACHE/corpus/v1/manifest.json

A document's split is a pure function of its id (``split_of``), so it never moves when
other documents are added or removed. One source, the English Debian Handbook, is only ever
held out: no training text comes from it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .paths import cache_dir, corpus_dir
from .text_cleaning import clean_rst, docbook_paragraphs, is_prose, looks_french, parse_foldoc

SPLITS = ("train", "calib", "heldout")
#: Per-mille thresholds of ``split_of``: 90 % train, 5 % calib, 5 % heldout.
_SPLIT_BOUNDS = ((900, "train"), (950, "calib"), (1000, "heldout"))


class CorpusError(RuntimeError):
    """A corpus source could not be fetched or read; the message names the package."""


@dataclass(frozen=True)
class Domain:
    name: str
    package: str | None  # Debian package, or None for local sources
    licence: str
    description: str
    documents: Callable[[Path], Iterator[tuple[str, str]]]  # root -> (doc id, text)
    heldout_only: bool = False
    max_chars: int | None = None  # cap so one huge source does not swamp the mix


def split_of(domain: str, doc_id: str) -> str:
    """Deterministic split of a document from the SHA-1 of ``domain/doc_id``."""
    bucket = int(hashlib.sha1(f"{domain}/{doc_id}".encode()).hexdigest()[:8], 16) % 1000
    return next(name for bound, name in _SPLIT_BOUNDS if bucket < bound)


# ---------------------------------------------------------------- document readers


def _rst_documents(files: list[Path], root: Path) -> Iterator[tuple[str, str]]:
    for path in files:
        raw = gzip.open(path, "rt", errors="replace").read() if path.suffix == ".gz" else path.read_text(errors="replace")
        paragraphs = [p for p in clean_rst(raw) if is_prose(p)]
        if paragraphs:
            yield str(path.relative_to(root)), "\n\n".join(paragraphs)


def linux_documents(root: Path) -> Iterator[tuple[str, str]]:
    base = root / "usr/share/doc/linux-doc-6.1/Documentation"
    files = sorted(p for p in base.rglob("*.rst.gz") if "translations" not in p.parts)
    yield from _rst_documents(files, base)


def python_docs_documents(root: Path) -> Iterator[tuple[str, str]]:
    base = root / "usr/share/doc/python3.11/html/_sources"
    yield from _rst_documents(sorted(base.rglob("*.rst.txt")), base)


def foldoc_documents(root: Path) -> Iterator[tuple[str, str]]:
    raw = gzip.open(root / "usr/share/dictd/foldoc.dict.dz", "rt", errors="replace").read()
    seen: set[str] = set()
    for head, text in parse_foldoc(raw):
        doc_id = head if head not in seen else f"{head}#{len(seen)}"
        seen.add(doc_id)
        yield doc_id, text


def _handbook_documents(root: Path, language: str, keep=lambda p: True) -> Iterator[tuple[str, str]]:
    base = root / "usr/share/doc/debian-handbook/html" / language
    for path in sorted(base.glob("*.html")):
        paragraphs = [p for p in docbook_paragraphs(path.read_text(errors="replace")) if len(p.split()) >= 6 and keep(p)]
        # Chapters are long and few; blocks of paragraphs give the split rule enough documents.
        for start in range(0, len(paragraphs), 8):
            yield f"{path.name}#{start // 8}", "\n\n".join(paragraphs[start : start + 8])


def french_documents(root: Path) -> Iterator[tuple[str, str]]:
    yield from _handbook_documents(root, "fr-FR", keep=looks_french)


def handbook_en_documents(root: Path) -> Iterator[tuple[str, str]]:
    yield from _handbook_documents(root, "en-US")


def python_code_documents(root: Path) -> Iterator[tuple[str, str]]:
    """The Python standard library sources of the running interpreter (tests excluded)."""
    base = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "idlelib", "lib2to3", "turtledemo", "__pycache__", "encodings"}
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(base)
        if skip.intersection(rel.parts) or path.stat().st_size > 150_000:
            continue
        text = path.read_text(errors="replace").strip()
        if len(text) > 500:
            yield str(rel), text


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("linux", "linux-doc-6.1", "GPL-2.0", "Linux kernel documentation prose (rST, translations excluded)", linux_documents),
        Domain("python_docs", "python3.11-doc", "PSF-2.0", "Python 3.11 documentation prose (rST sources)", python_docs_documents),
        Domain("foldoc", "dict-foldoc", "GFDL-1.1+", "Free On-line Dictionary of Computing entries", foldoc_documents),
        Domain("code", None, "PSF-2.0", "Python standard library sources of the running interpreter", python_code_documents, max_chars=8_000_000),
        Domain("french", "debian-handbook", "GPL-2.0+ or CC-BY-SA-3.0", "Debian Administrator's Handbook, French (fr-FR)", french_documents),
        Domain("handbook", "debian-handbook", "GPL-2.0+ or CC-BY-SA-3.0", "Debian Administrator's Handbook, English (en-US); held out only", handbook_en_documents, heldout_only=True),
    )
}
TRAIN_DOMAINS = tuple(name for name, d in DOMAINS.items() if not d.heldout_only)


# ---------------------------------------------------------------- fetching


def fetch_package(package: str, debs: Path | None = None, extracted: Path | None = None) -> Path:
    """Download one Debian package with ``apt-get download`` and unpack it; returns its root."""
    debs = debs or cache_dir() / "debs"
    root = (extracted or cache_dir() / "extracted") / package
    if (root / ".done").exists():
        return root
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        if shutil.which("apt-get") is None:
            raise CorpusError(f"cannot fetch Debian package {package!r}: apt-get is not available on this machine")
        proc = subprocess.run(["apt-get", "download", package], cwd=debs, capture_output=True, text=True)
        found = sorted(debs.glob(f"{package}_*.deb"))
        if proc.returncode != 0 or not found:
            raise CorpusError(
                f"apt-get could not download Debian package {package!r} (exit {proc.returncode}): "
                f"{proc.stderr.strip()[-500:]}\nRun `apt-get update` first, or check the package name."
            )
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    proc = subprocess.run(["dpkg-deb", "-x", str(found[-1]), str(root)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CorpusError(f"dpkg-deb could not unpack {found[-1].name} for package {package!r}: {proc.stderr.strip()}")
    (root / ".done").write_text(found[-1].name)
    return root


def apt_update() -> None:
    """``apt-get update`` once per cache (the lists are needed before ``apt-get download``)."""
    stamp = cache_dir() / "debs" / ".apt-updated"
    if stamp.exists() or shutil.which("apt-get") is None:
        return
    proc = subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True)
    if proc.returncode == 0:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text("ok")


# ---------------------------------------------------------------- building


def build_corpus(force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Fetch, clean and split every domain; returns the corpus directory. Cached."""
    out = corpus_dir()
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and not force:
        return out
    if any(d.package for d in DOMAINS.values()):
        apt_update()
    manifest: dict[str, dict] = {}
    for name, domain in DOMAINS.items():
        root = fetch_package(domain.package) if domain.package else Path("/")
        handles = {s: open(_tmp(out / name / f"{s}.jsonl"), "w") for s in SPLITS}
        stats = {s: {"documents": 0, "chars": 0} for s in SPLITS}
        docs = sorted(domain.documents(root), key=lambda d: hashlib.sha1(d[0].encode()).hexdigest())
        total = 0
        for doc_id, text in docs:
            if domain.max_chars and total >= domain.max_chars:
                break
            split = "heldout" if domain.heldout_only else split_of(name, doc_id)
            handles[split].write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
            stats[split]["documents"] += 1
            stats[split]["chars"] += len(text)
            total += len(text)
        for split, handle in handles.items():
            handle.close()
            _tmp(out / name / f"{split}.jsonl").replace(out / name / f"{split}.jsonl")
        manifest[name] = {
            "package": domain.package,
            "licence": domain.licence,
            "description": domain.description,
            "heldout_only": domain.heldout_only,
            "splits": stats,
        }
        log(f"{name:12s} " + "  ".join(f"{s}={stats[s]['chars'] / 1e6:.2f}MB/{stats[s]['documents']}docs" for s in SPLITS))
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return out


def _tmp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_suffix(".partial")


def read_split(domain: str, split: str, corpus: Path | None = None) -> Iterator[dict]:
    """Documents ``{"id", "text"}`` of one domain split of the built corpus."""
    path = (corpus or corpus_dir()) / domain / f"{split}.jsonl"
    if not path.exists():
        raise CorpusError(f"corpus split {domain}/{split} not found at {path}; run `moepress zoo corpus` first")
    with open(path) as handle:
        for line in handle:
            yield json.loads(line)


def corpus_table(manifest: dict) -> str:
    """The markdown table of sizes and licences for README_CORPUS.md."""
    rows = [
        "| domain | source | licence | train | calib | heldout |",
        "|---|---|---|---|---|---|",
    ]
    for name, info in manifest.items():
        cells = [
            f"{info['splits'][s]['chars'] / 1e6:.2f} MB ({info['splits'][s]['documents']} docs)" for s in SPLITS
        ]
        source = f"`{info['package']}`" if info["package"] else "interpreter stdlib"
        rows.append(f"| {name} | {source}: {info['description']} | {info['licence']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
