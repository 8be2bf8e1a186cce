"""data.py tests on tiny corpora in tmp_path (and one build of the real default corpus)."""

import json
import os
import random
import time

import numpy as np
import pytest

import corpus
import data
from data import dtype_for_vocab, load_meta, load_tokens, prepare_pretrain
from files import DataError
from tokenizer import BOS_ID, EOS_ID, SPECIAL_TOKENS, TrieTokenizer, load_tokenizer


def make_docs(n=40, seed=0):
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "über", "日本", "😀", "x"]
    return [f"doc {i}: " + "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
                                      for _ in range(rng.randint(1, 6))) for i in range(n)]


def write_txt(folder, docs):
    paths = []
    for i, doc in enumerate(docs):
        paths.append(str(folder / f"doc{i:03d}.txt"))
        with open(paths[-1], "w", encoding="utf-8", newline="") as f:
            f.write(doc)
    return paths


def split_docs(out_dir, split):
    """The documents of one split, decoded, cut at bos ... eos."""
    meta = load_meta(out_dir)
    tok = load_tokenizer(os.path.join(out_dir, meta["tokenizer"]))
    ids = np.asarray(load_tokens(out_dir, split, meta)).tolist()
    docs, start = [], None
    for i, t in enumerate(ids):
        if t == BOS_ID:
            assert start is None, "bos inside a document"
            start = i
        elif t == EOS_ID:
            assert start is not None, "eos without bos"
            docs.append(tok.decode(ids[start + 1:i]))
            start = None
    assert start is None, "last document not closed by eos"
    assert sum(len(tok.encode(d)) + 2 for d in docs) == len(ids)
    return docs


def build(tmp_path, inputs, name="out", **kw):
    kw = {"vocab_size": 100, "val_ratio": 0.3, "workers": 1, "progress": False, **kw}
    out = str(tmp_path / name)
    return out, prepare_pretrain(inputs, out, **kw)


def read_bins(out):
    return {f: open(os.path.join(out, f), "rb").read() for f in ("train.bin", "val.bin", "tokenizer.json", "meta.json")}


def test_documents_round_trip_and_split(tmp_path):
    docs = make_docs()
    out, meta = build(tmp_path, write_txt(tmp_path, docs))
    train, val = split_docs(out, "train"), split_docs(out, "val")
    assert sorted(train + val) == sorted(docs)
    assert not set(train) & set(val) and train and val
    assert (meta["train_documents"], meta["val_documents"]) == (len(train), len(val))
    for split in ("train", "val"):
        assert os.path.getsize(os.path.join(out, f"{split}.bin")) == 2 * meta[f"{split}_tokens"]
    assert meta["dtype"] == "uint16" and meta["skipped_lines"] == 0
    assert val == [d for d in docs if d in set(val)]  # val keeps the source order


def test_workers_do_not_change_the_output(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "PIECE_CHARS", 40)  # many pieces per document
    paths = write_txt(tmp_path, make_docs(30))
    out1, _ = build(tmp_path, paths, "w1", workers=1, part_mb=0.001)
    out2, _ = build(tmp_path, paths, "w2", workers=2, part_mb=0.001)
    assert read_bins(out1) == read_bins(out2)


def test_pieces_of_long_documents_tokenize_like_the_whole(tmp_path, monkeypatch):
    paths = write_txt(tmp_path, make_docs(10))
    whole, _ = build(tmp_path, paths, "whole")
    monkeypatch.setattr(data, "PIECE_CHARS", 16)
    pieces, _ = build(tmp_path, paths, "pieces")
    assert read_bins(whole) == read_bins(pieces)


def test_no_split_inside_a_document_when_a_token_spans_a_newline(tmp_path, monkeypatch):
    docs = ["ab\nab\nab\nab", "b\nab\na\nb"]
    tok = TrieTokenizer(SPECIAL_TOKENS + ["\n", "a", "b", "b\na"])  # "b\na": a cut after '\n' is not exact
    cut = data._cut_finder(tok)  # no cut inside "b\na"; one between "a" and "b", which no token holds
    assert cut("b\nab", 1) == 3 and cut("b\na", 1) == -1
    tok.save(tmp_path / "tok.json")
    monkeypatch.setattr(data, "PIECE_CHARS", 2)
    out, meta = build(tmp_path, write_txt(tmp_path, docs), tokenizer=str(tmp_path / "tok.json"), val_ratio=0)
    ids = np.fromfile(os.path.join(out, "train.bin"), dtype=np.uint16).tolist()
    cut = ids.index(EOS_ID) + 1
    assert sorted([ids[:cut], ids[cut:]]) == sorted([BOS_ID] + tok.encode(d) + [EOS_ID] for d in docs)
    assert sorted(split_docs(out, "train")) == sorted(docs)


def test_rerun_is_up_to_date_and_force_rebuilds_identically(tmp_path, capsys):
    paths = write_txt(tmp_path, make_docs(20))
    out, meta = build(tmp_path, paths)
    before = read_bins(out)
    mtimes = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in before}
    capsys.readouterr()
    assert build(tmp_path, paths)[1] == meta
    assert "up to date" in capsys.readouterr().out
    assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in before} == mtimes
    time.sleep(0.01)
    build(tmp_path, paths, force=True)
    assert "up to date" not in capsys.readouterr().out
    assert read_bins(out) == before
    assert build(tmp_path, paths, seed=7)[1]["fingerprint"] != meta["fingerprint"]  # options count


def test_stale_or_truncated_dataset_is_rebuilt_or_reported(tmp_path):
    paths = write_txt(tmp_path, make_docs(20))
    out, meta = build(tmp_path, paths)
    with open(os.path.join(out, "train.bin"), "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="train.bin"):
        load_meta(out)
    build(tmp_path, paths)  # not up to date any more: rebuilt
    assert load_meta(out) == meta
    os.remove(os.path.join(out, "meta.json"))
    with pytest.raises(DataError, match="meta.json"):
        load_meta(out)


def test_shuffle_over_several_parts(tmp_path):
    docs = make_docs(60)
    out, meta = build(tmp_path, write_txt(tmp_path, docs), part_mb=0.0005, val_ratio=0.1)
    assert meta["parts"] > 5
    train = split_docs(out, "train")
    assert len(train) == len(set(train)) == meta["train_documents"]
    source_order = [d for d in docs if d in set(train)]
    assert sorted(train) == sorted(source_order) and train != source_order


def test_jsonl_bad_lines_are_counted_and_reported(tmp_path, capsys):
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": "good one"}), "not json", json.dumps({"txt": "x"}), "",
             json.dumps({"text": 5}), json.dumps(["text"]), json.dumps({"text": "good\ntwo", "id": 1}),
             '{"text": "lone \\ud800 surrogate"}', "[" * 100_000 + "]" * 100_000]  # (nested past the parser's reach)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out, meta = build(tmp_path, [str(path)], val_ratio=0)
    err = capsys.readouterr().err
    assert meta["skipped_lines"] == 6
    for n in (2, 3, 5, 6, 8, 9):
        assert f"corpus.jsonl:{n}:" in err
    assert "corpus.jsonl:4:" not in err and "corpus.jsonl:1:" not in err
    assert sorted(split_docs(out, "train")) == sorted(["good one", "good\ntwo"])


def test_blankline_separated_documents(tmp_path):
    path = tmp_path / "many.txt"
    path.write_text("\n\nfirst doc\nline two\n\n\n\nsecond\n\nthird", encoding="utf-8")
    out, meta = build(tmp_path, [str(path)], doc_sep="blankline", val_ratio=0)
    assert sorted(split_docs(out, "train")) == ["first doc\nline two\n", "second\n", "third"]


def test_bpe_pipeline(tmp_path):
    docs = make_docs(8)
    out, meta = build(tmp_path, write_txt(tmp_path, docs), tokenizer="bpe", val_ratio=0)
    tok = load_tokenizer(os.path.join(out, "tokenizer.json"))
    ids = np.fromfile(os.path.join(out, "train.bin"), dtype=np.uint16)
    assert meta["vocab_size"] == 50263 and meta["dtype"] == "uint16"
    assert (ids == tok.bos_id).sum() == (ids == tok.eos_id).sum() == 8
    assert sorted(tok.decode(ids.tolist()).split("<|eos|>")[:-1]) == sorted("<|bos|>" + d for d in docs)


def test_dtype_choice():
    assert dtype_for_vocab(4096) == dtype_for_vocab(65536) == "uint16"
    assert dtype_for_vocab(65537) == "uint32"


def test_bad_inputs(tmp_path, capsys):
    with pytest.raises(DataError, match="nope.txt"):
        prepare_pretrain([str(tmp_path / "nope.txt")], str(tmp_path / "out"))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(DataError, match="x.csv"):
        prepare_pretrain([str(tmp_path / "x.csv")], str(tmp_path / "out"))
    (tmp_path / "empty.txt").write_text(" \n\n")
    for tokenizer in ("trie", "bpe"):
        with pytest.raises(DataError, match="no documents"):
            prepare_pretrain([str(tmp_path / "empty.txt")], str(tmp_path / "out"), tokenizer=tokenizer, workers=1)
    assert not os.path.exists(tmp_path / "out" / "meta.json")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match="latin1.txt.*UTF-8"):
        prepare_pretrain([str(tmp_path / "latin1.txt")], str(tmp_path / "out"), workers=1)
    capsys.readouterr()
    assert data.main(["--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope.txt" in err and "Traceback" not in err


def test_default_corpus_reader_first_chapters():
    bible, books = corpus.default_corpus_files()
    with open(bible, "rb") as f:
        chapters = [doc[0] for _, doc in zip(range(3), corpus.bible_chapters(f, books))]
    assert chapters[0].startswith("Genesis 1\nIn the beginning God created the heavens and the earth.\n")
    assert chapters[1].startswith("Genesis 2\n") and chapters[2].startswith("Genesis 3\n")
    assert chapters[0].count("\n") == 32 and "{" not in "".join(chapters) and "  " not in "".join(chapters)


def test_default_corpus_build(tmp_path):
    out = str(tmp_path / "bible")
    meta = prepare_pretrain(out_dir=out, workers=2, progress=False)
    assert meta["train_documents"] + meta["val_documents"] == 1189  # chapters of the Bible
    assert meta["val_documents"] >= 5 and meta["val_tokens"] >= 0.005 * (meta["train_tokens"] + meta["val_tokens"])
    assert meta["vocab_size"] == 4096 and meta["val_ratio"] == 0.02
    val = split_docs(out, "val")
    assert all(doc.split("\n", 1)[0].rsplit(" ", 1)[1].isdigit() for doc in val)  # "Book N" headers
