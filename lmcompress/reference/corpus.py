"""The reference corpus: real English text from three Debian packages.

    apt-get download dict-gcide bible-kjv-text fortunes
    python -m lmcompress.reference.corpus --debs . --out corpus/

Sources (all free to redistribute, see each package's copyright file):
    dict-gcide      Webster's 1913 dictionary (GCIDE), one document per entry
    bible-kjv-text  King James Bible, one document per chapter
    fortunes        the fortune-cookie collection, one document per fortune

Text files hold one document per block, blocks separated by one blank line, and
one paragraph per line (wrapped lines are joined).  Documents are assigned to
splits by a hash of their text, so the split never depends on file order:
    heldout ~2%     evaluation only; heldout.txt keeps the first --max-eval-bytes
                    of it (hash order), valid.txt the rest (for early stopping)
    train           the rest; calib.txt is a hash-chosen ~1% sample of train
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import re
import struct
import subprocess
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lmcompress.errors import LmcError

PACKAGES = ("dict-gcide", "bible-kjv-text", "fortunes")
HELDOUT_PER_MILLE = 20
CALIB_PER_MILLE = 10
DEFAULT_MAX_EVAL_BYTES = 400_000

# --- .deb access -------------------------------------------------------------


def find_deb(debs_dir: Path, package: str) -> Path:
    found = sorted(debs_dir.glob(f"{package}_*.deb"))
    if not found:
        raise LmcError(
            f"no {package}_*.deb in {debs_dir}; run `apt-get download {' '.join(PACKAGES)}` there"
        )
    return found[-1]


def deb_files(deb: Path, prefix: str) -> dict[str, bytes]:
    """Regular files of a .deb's data archive whose path starts with `prefix` (e.g. './usr/lib/')."""
    try:
        tar_bytes = subprocess.run(
            ["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise LmcError(f"cannot unpack {deb} ({exc}); install dpkg or re-download the package") from exc
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return {
            m.name: tar.extractfile(m).read()
            for m in tar.getmembers()
            if m.isfile() and m.name.startswith(prefix)
        }


# --- text normalisation ------------------------------------------------------

_SPACES = re.compile(r"\s+")


def paragraphs(lines: Iterable[str]) -> list[str]:
    """Join wrapped lines: a paragraph is a run of non-blank lines, whitespace collapsed."""
    out: list[str] = []
    current: list[str] = []
    for line in list(lines) + [""]:
        if line.strip():
            current.append(line)
        elif current:
            out.append(_SPACES.sub(" ", " ".join(current)).strip())
            current = []
    return out


# --- GCIDE (dictd format) ----------------------------------------------------

# dictd's index: headword \t offset \t length, numbers in base64 digits (most significant first).
_B64_DIGITS = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}

# "[1913 Webster]", "[WordNet 1.5 +PJC]" ...: provenance tags that end a sense.  Text after
# one on the same line is a conversion artefact (a stray headword), so it goes too.
_SOURCE_TAG = re.compile(r"\[[^\]]*(?:Webster|WordNet|PJC|Century|RDH|\bAS\b)[^\]]*\].*")
# "\Af*fect"\": the pronunciation after each headword; "(sp[^u]rt)" or "(? or ?)" a respelling.
_PRONUNCIATION = re.compile(r"\\[^\\\n]*\\")
_RESPELLING = re.compile(r"\((?:[^()]*\[[^\]]{1,6}\][^()]*|[?\s,or]*)\)")
# "[=a]", "[e^]", "['e]": a letter with a diacritic, written in ASCII.
_ACCENTED = re.compile(r"\[[=\-~.'\"`^,*]?([a-zA-Z]{1,2})\^?\]")
_NAMED_SYMBOLS = {
    "imac": "i", "aum": "a", "add": "a", "asl": "a", "udd": "u", "eth": "th", "thorn": "th",
    "yogh": "gh", "deg": "°", "sect": "§", "root": "√", "alpha": "α", "beta": "β",
}
_NAMED = re.compile(r"\[(" + "|".join(_NAMED_SYMBOLS) + r")\]")
_CROSS_REF = re.compile(r"\{([^{}]*)\}")


def _b64_number(digits: str) -> int:
    value = 0
    for c in digits:
        value = value * 64 + _B64_DIGITS[c]
    return value


def gcide_entries(dict_bytes: bytes, index_text: str) -> list[str]:
    """Raw entries in file order, without dictd's own '00-database-*' entries.

    GCIDE's '00-gcide-*' and '00-web1913-info' notes stay: they are English prose
    (licence and history), and the committed tokenizer was learned with them.
    """
    spans = set()
    for line in index_text.splitlines():
        headword, offset, length = line.split("\t")[:3]
        if not headword.startswith("00-database"):
            spans.add((_b64_number(offset), _b64_number(length)))
    # Offsets count bytes; a few entries hold stray cp1252 bytes, hence "replace".
    return [dict_bytes[o : o + n].decode("utf-8", "replace") for o, n in sorted(spans)]


def clean_gcide_entry(entry: str) -> str:
    entry = _SOURCE_TAG.sub("", entry)
    entry = _PRONUNCIATION.sub("", entry)
    entry = _RESPELLING.sub("", entry)
    entry = _NAMED.sub(lambda m: _NAMED_SYMBOLS[m.group(1)], entry)
    entry = _ACCENTED.sub(r"\1", entry)
    entry = _CROSS_REF.sub(r"\1", entry)
    text = "\n".join(paragraphs(entry.splitlines()))
    return re.sub(r" ([,.;:])", r"\1", text)


def gcide_documents(dict_bytes: bytes, index_text: str) -> Iterator[str]:
    for entry in gcide_entries(dict_bytes, index_text):
        doc = clean_gcide_entry(entry)
        if len(doc) >= 40:  # bare cross-references ("Afeard, see Afraid") carry no text
            yield doc


# --- KJV Bible (bible-kjv's block-compressed file) ---------------------------


def bible_text(data: bytes) -> str:
    """Decode /usr/lib/bible.data: an 80-byte banner, then big-endian
    (0, block_size, n_blocks), n_blocks + 1 block offsets, and at the first
    offset minus 3 the 3-byte header of Unix `compress`; every block is an LZW
    stream that shares that header.  gzip reads `compress` streams."""
    if not data.startswith(b"EC02"):
        raise LmcError("bible.data is not bible-kjv's EC02 format; re-download bible-kjv-text")
    _, _, n_blocks = struct.unpack(">3I", data[80:92])
    offsets = struct.unpack(f">{n_blocks + 1}I", data[92 : 96 + 4 * n_blocks])
    header = data[offsets[0] - 3 : offsets[0]]
    blocks = []
    for start, end in zip(offsets, offsets[1:]):
        stream = header + data[start:end]
        blocks.append(subprocess.run(["gzip", "-dc"], input=stream, check=True, capture_output=True).stdout)
    return b"".join(blocks).decode("ascii")


_VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


def bible_documents(text: str) -> Iterator[str]:
    """One document per chapter, one verse per line, references dropped."""
    chapter: tuple[str, str] | None = None
    verses: list[str] = []
    for line in text.splitlines():
        match = _VERSE.match(line)
        if not match:
            continue  # the banner line
        book, number, _, verse = match.groups()
        if (book, number) != chapter and verses:
            yield "\n".join(verses)
            verses = []
        chapter = (book, number)
        verses.append(verse.strip())
    if verses:
        yield "\n".join(verses)


# --- fortunes ----------------------------------------------------------------

_OVERSTRIKE = re.compile(r".\x08")  # "_\bx" underlines x on a teletype
_SKIPPED_FORTUNE_FILES = {"ascii-art"}  # pictures, not text


def fortune_documents(files: dict[str, bytes]) -> Iterator[str]:
    for name in sorted(files):
        base = name.rsplit("/", 1)[-1]
        if "." in base or base in _SKIPPED_FORTUNE_FILES:
            continue  # strfile indexes (*.dat)
        text = _OVERSTRIKE.sub("", files[name].decode("utf-8", "replace"))
        for fortune in re.split(r"^%$", text, flags=re.MULTILINE):
            doc = "\n".join(paragraphs(fortune.splitlines()))
            if doc:
                yield doc


# --- splits ------------------------------------------------------------------


@dataclass(frozen=True)
class Splits:
    train: list[str]
    valid: list[str]
    heldout: list[str]
    calib: list[str]


def _digest(doc: str) -> int:
    return int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "big")


def _take_bytes(docs: list[str], budget: int) -> int:
    """How many leading docs fit in `budget` bytes of a split file."""
    used = 0
    for i, doc in enumerate(docs):
        used += len(doc.encode("utf-8")) + 2
        if used > budget:
            return i
    return len(docs)


def split_documents(docs: Iterable[str], max_eval_bytes: int = DEFAULT_MAX_EVAL_BYTES) -> Splits:
    """Deduplicate, order by hash (so any prefix is a fair sample), split by hash."""
    unique = sorted({_digest(d): d for d in docs}.items())
    heldout = [d for h, d in unique if h % 1000 < HELDOUT_PER_MILLE]
    train = [d for h, d in unique if h % 1000 >= HELDOUT_PER_MILLE]
    calib = [d for h, d in unique if h % 1000 >= HELDOUT_PER_MILLE and (h // 1000) % 1000 < CALIB_PER_MILLE]
    n_eval = _take_bytes(heldout, max_eval_bytes)
    return Splits(
        train=train,
        valid=heldout[n_eval:],
        heldout=heldout[:n_eval],
        calib=calib[: _take_bytes(calib, max_eval_bytes)],
    )


def read_documents(path: str | Path) -> list[str]:
    """The documents of a split file written by this module."""
    return Path(path).read_text(encoding="utf-8").rstrip("\n").split("\n\n")


def write_documents(path: Path, docs: list[str]) -> None:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")


def build_corpus(debs_dir: Path) -> list[str]:
    gcide = deb_files(find_deb(debs_dir, "dict-gcide"), "./usr/share/dictd/gcide.")
    # dictzip (.dz) is gzip with a random-access table in an extra header field.
    dict_bytes = gzip.decompress(gcide["./usr/share/dictd/gcide.dict.dz"])
    index_text = gcide["./usr/share/dictd/gcide.index"].decode("utf-8", "replace")
    bible = deb_files(find_deb(debs_dir, "bible-kjv-text"), "./usr/lib/bible.data")
    fortunes = deb_files(find_deb(debs_dir, "fortunes"), "./usr/share/games/fortunes/")
    return [
        *gcide_documents(dict_bytes, index_text),
        *bible_documents(bible_text(bible["./usr/lib/bible.data"])),
        *fortune_documents(fortunes),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debs", type=Path, required=True, help="folder with the three .deb files")
    parser.add_argument("--out", type=Path, required=True, help="folder for train/valid/heldout/calib .txt")
    parser.add_argument("--max-eval-bytes", type=int, default=DEFAULT_MAX_EVAL_BYTES)
    args = parser.parse_args(argv)
    splits = split_documents(build_corpus(args.debs), args.max_eval_bytes)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("train", "valid", "heldout", "calib"):
        docs = getattr(splits, name)
        write_documents(args.out / f"{name}.txt", docs)
        print(f"{name}.txt: {len(docs)} documents, {(args.out / f'{name}.txt').stat().st_size} bytes")


if __name__ == "__main__":
    main()
