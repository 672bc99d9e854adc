"""The corpus recipe: parsing of the three Debian sources, cleaning, and the hash split."""

import struct

import pytest

from lmcompress.errors import LmcError
from lmcompress.reference import REFERENCE_CALIB, REFERENCE_HELDOUT
from lmcompress.reference.corpus import (
    bible_documents,
    bible_text,
    clean_gcide_entry,
    find_deb,
    fortune_documents,
    gcide_entries,
    read_documents,
    split_documents,
)

SPURT = (
    'Spurt \\Spurt\\ (sp[^u]rt), n. [Cf. Icel. sprettr a spurt, spring,\n'
    "   run, spretta to spirt, spring.]\n"
    "   A sudden and energetic effort, as in an emergency; an\n"
    "   increased exertion for a brief space.\n"
    "   [1913 Webster]\n\n"
    '         The long, steady sweep of the so-called "paddle" tried\n'
    "         him almost as much as the breathless strain of the\n"
    "         spurt.                                   --T. Hughes.\n"
    "   [1913 Webster] Spurted\n"
)


def test_gcide_entry_loses_markup_and_keeps_paragraphs():
    assert clean_gcide_entry(SPURT) == (
        "Spurt, n. [Cf. Icel. sprettr a spurt, spring, run, spretta to spirt, spring.] "
        "A sudden and energetic effort, as in an emergency; an increased exertion for a brief space.\n"
        'The long, steady sweep of the so-called "paddle" tried him almost as much as the '
        "breathless strain of the spurt. --T. Hughes."
    )


def test_gcide_entry_spells_out_accents_and_cross_references():
    entry = "Abate \\A*bate\"\\, v. t. See {Bate}. From F. ab[^a]tre, b[=e]te.\n   [PJC]\n"
    assert clean_gcide_entry(entry) == "Abate, v. t. See Bate. From F. abatre, bete."


def _b64(n: int) -> str:
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out = digits[n % 64] + out
        n //= 64
        if not n:
            return out


def test_gcide_entries_follow_the_dictd_index_once_per_entry():
    first, second = "Apple, n. A fruit.\n", "Pear, n. Another fruit.\n"
    data = ("header\n" + first + second).encode()
    o1, o2 = len("header\n"), len("header\n" + first)
    index = "\n".join(
        [
            f"00-database-info\t{_b64(0)}\t{_b64(7)}",
            f"Pear\t{_b64(o2)}\t{_b64(len(second))}",
            f"Apple\t{_b64(o1)}\t{_b64(len(first))}",
            f"Apples\t{_b64(o1)}\t{_b64(len(first))}",  # a second headword of the same entry
        ]
    )
    assert gcide_entries(data, index) == [first, second]


def _lzw_literals(data: bytes) -> bytes:
    """A Unix `compress` code stream (after its 3-byte header) that spells every byte as a
    9-bit literal code, least significant bit first; valid while under ~250 codes."""
    bits = n_bits = 0
    out = bytearray()
    for byte in data:
        bits |= byte << n_bits
        n_bits += 9
        while n_bits >= 8:
            out.append(bits & 0xFF)
            bits >>= 8
            n_bits -= 8
    if n_bits:
        out.append(bits & 0xFF)
    return bytes(out)


def test_bible_data_blocks_are_decoded_and_split_into_chapters():
    blocks = [
        b"Banner line.\nGe1:1 In the beginning God created the heaven and the earth.\n",
        b"Ge1:2 And the earth was without form.\nGe2:1 Thus the heavens were finished.\n",
    ]
    streams = [_lzw_literals(b) for b in blocks]
    n = len(blocks)
    first = 92 + 4 * (n + 1) + 3  # after the offset table and the shared `compress` header
    offsets = [first, first + len(streams[0]), first + len(streams[0]) + len(streams[1])]
    data = (
        b"EC02Compressed Data File".ljust(80, b"\0")
        + struct.pack(">3I", 0, 65536, n)
        + struct.pack(f">{n + 1}I", *offsets)
        + b"\x1f\x9d\x90"
        + b"".join(streams)
    )
    text = bible_text(data)
    assert text == b"".join(blocks).decode()
    assert list(bible_documents(text)) == [
        "In the beginning God created the heaven and the earth.\nAnd the earth was without form.",
        "Thus the heavens were finished.",
    ]


def test_fortunes_split_on_percent_lines_and_lose_overstrike():
    files = {
        "./usr/share/games/fortunes/wisdom": b"A _\x08b_\x08o_\x08l_\x08d claim\nwrapped here.\n%\nSecond one.\n%\n",
        "./usr/share/games/fortunes/wisdom.dat": b"\x00\x02binary index",
        "./usr/share/games/fortunes/ascii-art": b"  /\\_/\\\n ( o.o )\n%\n",
    }
    assert list(fortune_documents(files)) == ["A bold claim wrapped here.", "Second one."]


def test_split_is_by_hash_deduplicated_and_capped():
    docs = [f"Document number {i} says something." for i in range(5000)]
    splits = split_documents(docs + docs[:100], max_eval_bytes=2000)
    again = split_documents(list(reversed(docs)), max_eval_bytes=2000)
    assert splits == again  # independent of input order, duplicates dropped
    heldout_all = splits.heldout + splits.valid
    assert 50 <= len(heldout_all) <= 150  # ~2% of 5000
    assert set(heldout_all).isdisjoint(splits.train)
    assert set(splits.calib) <= set(splits.train)
    assert sum(len(d) + 2 for d in splits.heldout) <= 2000
    assert len(splits.train) + len(heldout_all) == 5000


def test_committed_splits_are_small_and_disjoint():
    heldout, calib = read_documents(REFERENCE_HELDOUT), read_documents(REFERENCE_CALIB)
    assert REFERENCE_HELDOUT.stat().st_size <= 400_000 and REFERENCE_CALIB.stat().st_size <= 400_000
    assert len(heldout) > 1000 and len(calib) > 1000
    assert set(heldout).isdisjoint(calib)
    assert all(doc and doc == doc.strip() for doc in heldout)


def test_missing_deb_names_the_download_command(tmp_path):
    with pytest.raises(LmcError, match="apt-get download dict-gcide bible-kjv-text fortunes"):
        find_deb(tmp_path, "fortunes")
