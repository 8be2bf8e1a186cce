"""
Nano's built-in instruction set: question/answer pairs made offline from the default corpus.

    python sft_tasks.py -n 20000 -o dataset/sft_builtin.jsonl

Each pair is a small, checkable skill that a model pretrained on the default corpus can pick up
from a few hundred fine-tuning steps: copy, reverse, count, pick the first or last word, upper-
case, spell, add small numbers, and continue a verse it has read. Answers are computed here, so
they are always right. `data.py sft` uses this set when no JSONL is given; with your own data
write one {"question": ..., "answer": ...} per line (or {"messages": [...]}, see README).
"""

import argparse
import json
import os
import random
import re

from corpus import corpus_verses

WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")


def _phrase(rnd, words, lo, hi):
    return " ".join(rnd.choice(words) for _ in range(rnd.randint(lo, hi)))


def make_pair(rnd, verses, words):
    kind = rnd.randrange(9)
    if kind == 0:
        p = _phrase(rnd, words, 3, 5)
        return f"Reverse the words: {p}", " ".join(reversed(p.split()))
    if kind == 1:
        p = _phrase(rnd, words, 2, 9)
        return f"How many words are in: {p}", str(len(p.split()))
    if kind == 2:
        v = rnd.choice(verses)
        ws = WORD.findall(v)
        if not ws:
            return make_pair(rnd, verses, words)
        which = rnd.choice(("first", "last"))
        return f"What is the {which} word of: {v}", ws[0] if which == "first" else ws[-1]
    if kind == 3:
        w = rnd.choice(words)
        return f"Write in capitals: {w}", w.upper()
    if kind == 4:
        w = rnd.choice([w for w in words if 3 <= len(w) <= 8] or words)
        return f"Spell the word {w}", "-".join(w)
    if kind == 5:
        a, b = rnd.randint(0, 49), rnd.randint(0, 49)
        return f"What is {a} plus {b}?", str(a + b)
    if kind == 6:
        p = _phrase(rnd, words, 2, 6)
        return f"Repeat after me: {p}", p
    if kind == 7:
        v = rnd.choice(verses)
        ws = v.split()
        if len(ws) < 6:
            return make_pair(rnd, verses, words)
        cut = len(ws) // 2
        return f"Continue the verse: {' '.join(ws[:cut])}", " ".join(ws[cut:])
    a, b = sorted(rnd.sample(range(1, 20), 2))
    return f"Which is larger, {a} or {b}?", str(b)


def make_pairs(n, seed=0, verses=None):
    rnd = random.Random(seed)
    verses = verses if verses is not None else corpus_verses()
    counts = {}
    for v in verses:
        for w in WORD.findall(v):
            counts[w] = counts.get(w, 0) + 1
    words = sorted(w for w, c in counts.items() if c >= 20 and len(w) > 1)  # common words only
    return [dict(zip(("question", "answer"), make_pair(rnd, verses, words))) for _ in range(n)]


def write_jsonl(pairs, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write Nano's built-in instruction set as JSONL")
    ap.add_argument("-n", type=int, default=20000, help="number of pairs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--out", default="dataset/sft_builtin.jsonl")
    args = ap.parse_args(argv)
    pairs = make_pairs(args.n, args.seed)
    write_jsonl(pairs, args.out)
    print(f"wrote {len(pairs)} pairs to {args.out}")
    for p in pairs[:5]:
        print(f"  Q: {p['question']}\n  A: {p['answer']}")


if __name__ == "__main__":
    main()
