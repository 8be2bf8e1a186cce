"""Tokenizer tests: greedy longest match against a slow reference, round trips, files, BPE offline."""

import json
import random
import socket

import pytest

from tokenizer import (BOS_ID, EOS_ID, SPECIAL_TOKENS, UNK_ID, BPETokenizer, TokenizerError, TrieTokenizer,
                       load_tokenizer, tokenizer_from_dict)


def reference_encode(tokens, text):
    """Greedy longest match, the slow obvious way: at each position try the longest token first."""
    ids = {t: i for i, t in enumerate(tokens)}
    longest = max(map(len, tokens))
    out, i = [], 0
    while i < len(text):
        for n in range(min(longest, len(text) - i), 0, -1):
            if text[i:i + n] in ids:
                out.append(ids[text[i:i + n]])
                i += n
                break
        else:
            out.append(UNK_ID)
            i += 1
    return out


# symbols for random vocabularies: letters, multi-code-point clusters (e + combining accent, a flag,
# a family emoji), non-BMP characters, the special-token characters and regex metacharacters
SYMBOLS = (list("abcxyz") + ["e\u0301", "\U0001F1EF\U0001F1F5", "\U0001F468\u200d\U0001F469"]
           + ["😀", "𠀀", "é", "ß", "日", "本"] + list("<|>") + list(".*+?()[]\\^$-{},#&~ \n\t\r\x00"))


def random_vocab(rng, alphabet, n_tokens, max_len):
    tokens = set()
    for _ in range(n_tokens):
        tokens.add("".join(rng.choice(alphabet) for _ in range(rng.randint(1, max_len))))
    for s in rng.sample(alphabet, k=len(alphabet) // 2):  # many single symbols, not all: unknowns occur
        tokens.add(s)
    return SPECIAL_TOKENS + sorted(tokens - set(SPECIAL_TOKENS))


def test_greedy_longest_match_equals_reference():
    rng = random.Random(1234)
    for trial in range(300):
        if trial % 3 == 0:  # small alphabet, dense vocabulary: long chains of prefixes
            alphabet, n_tokens, max_len = rng.sample(SYMBOLS, 4), rng.randint(5, 60), 6
        elif trial % 3 == 1:  # large alphabet and vocabulary: nodes with > 16 children (bucketed)
            alphabet, n_tokens, max_len = SYMBOLS, rng.randint(100, 600), 4
        else:
            alphabet, n_tokens, max_len = rng.sample(SYMBOLS, rng.randint(2, 12)), rng.randint(1, 40), 8
        tokens = random_vocab(rng, alphabet, n_tokens, max_len)
        tok = TrieTokenizer(tokens)
        for _ in range(5):
            pool = alphabet + rng.sample(SPECIAL_TOKENS, 2) + ["?", "Q"]
            text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 120)))
            assert tok.encode(text) == reference_encode(tokens, text), (trial, tokens, text)


def test_round_trip_in_vocab_text_with_special_strings_and_non_bmp():
    text = "Hello <|bos|>wörld 😀😀 𠀀 <|eos|> <|unknown|><|padding|> <|instruct_mark|>x<|response_mark|>\n"
    tok = TrieTokenizer.build([text], 100)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert [tok.token_to_id[t] for t in SPECIAL_TOKENS] == list(range(6))
    for i, special in enumerate(SPECIAL_TOKENS):
        if special in text:
            assert i in ids
    assert tok.encode("😀")[0] == tok.token_to_id["😀"] and tok.encode("𠀀")[0] == tok.token_to_id["𠀀"]
    assert tok.encode("<|bos|>") == [BOS_ID] and tok.encode("<|eos|>") == [EOS_ID]


def test_out_of_vocab_characters_become_unknown():
    tok = TrieTokenizer.build(["abc abc"], 50)
    ids = tok.encode("abZc😀")
    assert ids.count(UNK_ID) == 2
    # the round trip is exact only for in-vocabulary text: an unknown decodes to <|unknown|>
    assert tok.decode(ids) == "ab<|unknown|>c<|unknown|>"
    assert tok.decode([10 ** 6, -1]) == "<|unknown|>" * 2


def test_build_respects_vocab_size_and_keeps_every_character():
    rng = random.Random(7)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    texts = [" ".join(rng.choice(words) for _ in range(50)) + " 😀 𠀀 é\n" for _ in range(20)]
    chars = set("".join(texts))
    for size in (len(chars) + 6, 40, 100, 1000):
        tok = TrieTokenizer.build(texts, size)
        assert tok.tokens[:6] == SPECIAL_TOKENS
        assert len(tok.tokens) <= size
        assert chars <= set(tok.tokens)
        assert tok.decode(tok.encode(texts[0])) == texts[0]
    assert len(TrieTokenizer.build(texts, 100).tokens) == 100  # enough words to fill it
    with pytest.raises(TokenizerError):
        TrieTokenizer.build(texts, len(chars) + 5)


def test_save_load_round_trip(tmp_path):
    tok = TrieTokenizer.build(["the cat sat on the mat, the end 😀\n"] * 3, 60)
    tok.save(tmp_path / "tok.json")
    back = load_tokenizer(tmp_path / "tok.json")
    assert back.tokens == tok.tokens
    assert tokenizer_from_dict(tok.to_dict()).tokens == tok.tokens
    assert back.encode("the mat 😀") == tok.encode("the mat 😀")


@pytest.mark.parametrize("content", [
    "not json",
    '{"type": "trie"}',
    '{"type": "trie", "tokens": "abc"}',
    '{"type": "trie", "tokens": ["a", "b"]}',  # no special tokens
    json.dumps({"type": "trie", "tokens": SPECIAL_TOKENS + ["a", "a"]}),  # duplicate
    json.dumps({"type": "trie", "tokens": SPECIAL_TOKENS + [""]}),  # empty token
    json.dumps({"type": "trie", "tokens": SPECIAL_TOKENS + [5]}),
    '{"type": "wordpiece"}',
    "[]",
])
def test_bad_vocab_files(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerError):
        load_tokenizer(path)


def test_missing_vocab_file(tmp_path):
    with pytest.raises(TokenizerError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer()


def test_bpe_round_trip_and_special_ids(bpe):
    text = "Hello, world! Ünïcödé 日本語 😀 𠀀\n\n  indented"
    assert bpe.decode(bpe.encode(text)) == text
    assert (bpe.pad_id, bpe.unk_id, bpe.bos_id, bpe.eos_id, bpe.instruct_id, bpe.response_id) == tuple(range(50257, 50263))
    assert bpe.vocab_size == 50263
    ids = bpe.encode("end<|eos|>")
    assert ids[-1] == bpe.eos_id and bpe.decode(ids) == "end<|eos|>"
    assert bpe.encode("<|bos|>") == [bpe.bos_id]


def test_bpe_works_offline(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache: the files must be local
    tok = BPETokenizer()
    assert tok.decode(tok.encode("offline works")) == "offline works"
    assert tokenizer_from_dict(tok.to_dict()).encode("a b") == tok.encode("a b")
