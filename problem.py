"""
Toy problems with exact answers: generate the data, train on it with train.py's loop, and measure
exact-match accuracy on held-out samples (issue #7).

    python problem.py q                          # generate, train, evaluate 10,000 held-out samples
    python problem.py sort --show 10             # ... then print 10 test samples with a check or a cross
    python problem.py add --eval checkpoint/problem/add/last.pt    # evaluate a saved model again

The tasks (question -> answer as shown; all digits and symbols are one token each):

    q        8086 -> 5                 closed loops in the digits (0 6 9: one, 8: two), numbers of 1-8 digits
    sort     114515 -> 111455          the digits sorted; six digits; bidirectional, one forward pass
    reverse  123456 -> 654321          the digits reversed; six digits; bidirectional, one forward pass
    calc     (+ (* 0 1) (* 1 1)) -> 1  prefix AND (*) / OR (+) over 0/1, nesting depth 1-4
    add      123+4567 -> 4690          decimal addition, operands of 1-10 digits; also tested on 11-12

How a task becomes training data. Causal tasks (q, calc, add) are written in the SFT layout that
train.SFTData reads: a row is the prompt ("8086=") then the answer and <|eos|>, and the loss mask
covers the answer and <|eos|> only, so the model learns to answer, not to invent questions.
Bidirectional tasks (sort, reverse) see the question and one placeholder "_" per answer digit
("114515=______") and are trained, position by position, to put the answer digit where each
placeholder is: the unshifted layout of train.SFTData ("shifted": false in meta.json).

Tricks, each a plain deviation from "the answer tokens are the only targets, one sample a row":
  * add writes its answer least-significant digit first ("123+4567=" -> "0964"), a well-known
    trick: each digit then comes after the ones it depends on (the carry comes from the right).
    What this script prints is always the normal "123+4567=4690".
  * calc is trained with auxiliary targets: at every ")" the model is also asked for the value of
    the bracket it closes (intermediate supervision; the rows are then unshifted, see train.SFTData).
    At test time it reads the question and answers after "=" like any causal task; the outputs at
    ")" are never looked at. calc also packs several expressions into each training row (they
    range from 7 to 91 characters) and draws depths 1-4 in proportion 1:1:2:4.

Held-out means held out: the test set is drawn first, from its own seed, and a training or
validation sample whose question is in it is rejected (the count is reported; disjointness is
asserted). Where the inputs of one length (or depth) are few, the test set takes at most a tenth
of them, so that training still sees that length: 1-digit numbers are only 10 questions.

Accuracy is exact match of the whole answer: greedy decoding with the KV cache for causal models
(batched, prompts of equal length together), one forward pass (Transformer.one_pass) for
bidirectional ones.
"""

import argparse
import hashlib
import json
import os
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

PROCESS_START = time.time()  # the wall time reported runs from here to the final accuracy

import numpy as np
import torch
from tqdm import tqdm

from data import dtype_for_vocab
from files import ConfigError, NanoError
from hf import load_checkpoint
from model import Decoder, ModelConfig, Transformer, model_from_checkpoint
from tokenizer import EOS_ID, PAD_ID, SPECIAL_TOKENS, TrieTokenizer
from train import TrainConfig, train

PLACEHOLDER = "_"  # stands where a bidirectional model must write an answer digit

# ---------------------------------------------------------------------------
# Generators: question -> answer, each from a seeded random.Random. `size` picks the length (or the
# depth) to draw, when the caller wants one; the tests check every answer with a solver of their own.

LOOPS = {"0": 1, "6": 1, "9": 1, "8": 2}  # closed loops drawn in each digit; the others have none


def gen_q(rng, cfg, size=None):
    n = size or rng.randint(1, cfg["max_digits"])
    number = str(rng.randrange(0 if n == 1 else 10 ** (n - 1), 10 ** n))  # no leading zeros
    return number, str(sum(LOOPS.get(d, 0) for d in number))


def gen_sort(rng, cfg, size=None):
    digits = "".join(rng.choice("0123456789") for _ in range(cfg["digits"]))
    counts = Counter(digits)  # counting sort
    return digits, "".join(d * counts[d] for d in "0123456789")


def gen_reverse(rng, cfg, size=None):
    digits = "".join(rng.choice("0123456789") for _ in range(cfg["digits"]))
    return digits, "".join(digits[i] for i in range(len(digits) - 1, -1, -1))


def _expression(rng, depth):
    """(text, value) of a random expression whose nesting depth is exactly `depth` (0: a literal)."""
    if depth == 0:
        value = rng.randint(0, 1)
        return str(value), value
    op = rng.choice("+*")
    deep = rng.randint(0, 1)  # one operand reaches depth - 1; the other any depth below that
    (a, va), (b, vb) = (_expression(rng, depth - 1 if i == deep else rng.randint(0, depth - 1)) for i in range(2))
    return f"({op} {a} {b})", (va & vb) if op == "*" else (va | vb)


def gen_calc(rng, cfg, size=None):
    depth = size or rng.choices(range(1, cfg["max_depth"] + 1), cfg["depth_weights"])[0]
    want = rng.randint(0, 1)  # the answer is drawn first, so the classes are balanced at every depth
    while True:
        text, value = _expression(rng, depth)
        if value == want:
            return text, str(value)


def _digits(rng, n):
    return str(rng.randrange(0 if n == 1 else 10 ** (n - 1), 10 ** n))


def gen_add(rng, cfg, size=None):
    n = size or rng.randint(1, cfg["max_digits"])  # the longer operand's length
    a, b = _digits(rng, n), _digits(rng, rng.randint(1, n))
    if rng.random() < 0.5:
        a, b = b, a
    # schoolbook addition, right to left, with a carry
    out, carry = [], 0
    for i in range(max(len(a), len(b))):
        s = carry + sum(int(x[-1 - i]) for x in (a, b) if i < len(x))
        out.append(str(s % 10))
        carry = s // 10
    if carry:
        out.append("1")
    return f"{a}+{b}", "".join(reversed(out))


def calc_brackets(text):
    """[(position of each ")", value of the bracket it closes)]: calc's auxiliary targets."""
    stack, out = [[]], []
    for i, ch in enumerate(text):
        if ch == "(":
            stack.append([])
        elif ch in "+*01":
            stack[-1].append(ch)
        elif ch == ")":
            op, *args = stack.pop()
            value = str(int(all(a == "1" for a in args) if op == "*" else any(a == "1" for a in args)))
            stack[-1].append(value)
            out.append((i, value))
    return out


def _calc_space(depth):
    """How many distinct expressions have nesting depth exactly `depth`."""
    upto = [2]  # expressions of depth <= d: a literal, or an operator over two of depth <= d - 1
    for _ in range(depth):
        upto.append(2 + 2 * upto[-1] ** 2)
    return upto[depth] - (upto[depth - 1] if depth else 0)


def _numbers_of_length(n):
    return 10 if n == 1 else 9 * 10 ** (n - 1)


# ---------------------------------------------------------------------------
# The tasks: generator, vocabulary, framing, default model and schedule


@dataclass
class Task:
    name: str
    generate: object  # gen_*(rng, settings, size=None) -> (question, answer)
    chars: str  # the vocabulary after the special tokens: one token per character
    settings: dict  # generator settings, recorded beside the checkpoint
    causal: bool
    model: dict  # ModelConfig fields (block_size, vocab_size and is_causal are filled in)
    train: dict  # TrainConfig fields
    separator: str = "="  # prompt = question + separator
    size_name: str = ""  # what the strata of the report are ("digits", "depth", ...); "" = none
    size: object = None  # question -> its length / depth
    space: object = None  # size -> how many distinct questions have it (caps the test set's share)
    reverse_answer: bool = False  # train and decode the answer least-significant digit first
    longer: list = field(default_factory=list)  # sizes tested beyond those trained on
    eval_block_size: int = 0  # a longer context for those (RoPE models only; 0: the model's own)
    pack: bool = False  # several samples per training row (causal tasks of very uneven length)
    aux: object = None  # question -> [(token position, label)]: extra training targets

    def prompt(self, question):
        return question + self.separator

    def target(self, answer):
        """The answer as the model writes it."""
        return answer[::-1] if self.reverse_answer else answer

    def answer_from_target(self, text):
        return text[::-1] if self.reverse_answer else text


TASKS = {
    "q": Task(
        "q", gen_q, "0123456789=", {"max_digits": 8}, causal=True,
        # counting is position-blind: RoPE; two layers suffice (attend to the loop digits, then read a count)
        model=dict(block_size=12, n_layer=2, n_embd=64, n_head=4, n_kv_head=4, n_hidden=192, use_rope=True),
        train=dict(batch_size=128, max_iters=2000, learning_rate=3e-3, min_lr=3e-4, warmup_iters=100),
        size_name="digits", size=len, space=_numbers_of_length),
    "sort": Task(
        "sort", gen_sort, "0123456789=_", {"digits": 6}, causal=False,
        model=dict(block_size=13, n_layer=3, n_embd=128, n_head=4, n_kv_head=4, n_hidden=384, use_rope=False),
        train=dict(batch_size=128, max_iters=2000, learning_rate=2e-3, min_lr=2e-4, warmup_iters=100),
        space=lambda _: 10 ** 6),
    "reverse": Task(
        "reverse", gen_reverse, "0123456789=_", {"digits": 6}, causal=False,
        # learned positions: "copy from the mirrored position" is a fixed position-to-position map
        model=dict(block_size=13, n_layer=2, n_embd=64, n_head=4, n_kv_head=4, n_hidden=192, use_rope=False),
        train=dict(batch_size=128, max_iters=1000, learning_rate=3e-3, min_lr=3e-4, warmup_iters=50),
        space=lambda _: 10 ** 6),
    "calc": Task(
        "calc", gen_calc, "01()+* =", {"max_depth": 4, "depth_weights": [1, 1, 2, 4]}, causal=True,
        separator=" =",
        model=dict(block_size=96, n_layer=4, n_embd=128, n_head=4, n_kv_head=4, n_hidden=384, use_rope=True),
        train=dict(batch_size=64, max_iters=1500, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100),
        size_name="depth", size=lambda q: max(_nesting(q)), space=_calc_space, pack=True, aux=calc_brackets),
    "add": Task(
        "add", gen_add, "0123456789+=", {"max_digits": 10}, causal=True, reverse_answer=True,
        # 34 tokens hold the longest trained sample (10+10 digits, 11 answer digits); 12+12 digits
        # take 40, which the RoPE model runs at without any new weights (see with_context)
        model=dict(block_size=34, n_layer=4, n_embd=128, n_head=4, n_kv_head=4, n_hidden=384, use_rope=True),
        train=dict(batch_size=128, max_iters=2000, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100),
        size_name="digits", size=lambda q: max(len(x) for x in q.split("+")),
        space=lambda n: 10 ** (2 * n) - (10 ** (2 * n - 2) if n > 1 else 0), longer=[11, 12],
        eval_block_size=40),
}


def _nesting(text):
    """Nesting depth after each character (0 outside all brackets); max() is the expression's depth."""
    depth, out = 0, [0]
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        out.append(depth)
    return out


def tokenizer_for(task):
    return TrieTokenizer(SPECIAL_TOKENS + list(task.chars))


# ---------------------------------------------------------------------------
# Test, validation and training samples


def test_set(task, n, settings=None, sizes=None):
    """n distinct (question, answer) pairs from the test seed. A size (length, depth) contributes at
    most a tenth of its questions (at least one), so that training keeps the other nine tenths.
    `sizes`: draw only these sizes, in turn (the longer-than-trained sets of add)."""
    settings = settings or task.settings
    rng = random.Random(f"problem {task.name} test {json.dumps(settings, sort_keys=True)}")
    seen, per_size, out, tries = set(), Counter(), [], 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise ValueError(f"{task.name}: cannot draw {n} distinct test questions")
        size = sizes[len(out) % len(sizes)] if sizes else None
        q, a = task.generate(rng, settings, size)
        s = task.size(q) if task.size else 0
        if q in seen or per_size[s] >= max(1, task.space(s) // 10):
            continue
        seen.add(q)
        per_size[s] += 1
        out.append((q, a))
    return out


def train_samples(task, n, seed, exclude, settings=None):
    """n (question, answer) pairs from the training seed, none of whose questions is in `exclude`;
    returns them and how many draws were rejected for colliding with it."""
    settings = settings or task.settings
    rng = random.Random(f"problem {task.name} train {seed}")
    out, rejected = [], 0
    while len(out) < n:
        q, a = task.generate(rng, settings)
        if q in exclude:
            rejected += 1
            continue
        out.append((q, a))
    return out, rejected


def encode_sample(task, tok, question, answer):
    """(ids, mask, targets) of one sample, as lists. Shifted (targets None: train.py predicts the
    next token): prompt, answer, <|eos|>, the mask on the answer and <|eos|>. Unshifted: targets[t]
    is what input position t is trained on: for a causal model the same answer tokens one position
    earlier plus the task's auxiliary labels; for a bidirectional one the answer under placeholders."""
    p, t = tok.encode(task.prompt(question)), tok.encode(task.target(answer))
    if not task.causal:
        return p + tok.encode(PLACEHOLDER * len(t)), [0] * len(p) + [1] * len(t), [PAD_ID] * len(p) + t
    ids = p + t + [EOS_ID]
    if not task.aux:
        return ids, [0] * len(p) + [1] * (len(t) + 1), None
    targets, mask = ids[1:] + [PAD_ID], [0] * (len(p) - 1) + [1] * (len(t) + 1) + [0]
    for pos, label in task.aux(question):  # e.g. calc: at each ")" the value of the bracket it closes
        targets[pos], mask[pos] = tok.token_to_id[label], 1
    return ids, mask, targets


def encode_rows(task, tok, pairs, block_size, pack=False):
    """Rows of block_size + 1 tokens as arrays (ids, mask, targets or None). One sample per row, or
    (pack) as many whole samples as fit, one after another, like data.prepare_sft's packing."""
    row_len = block_size + 1
    shifted = task.causal and not task.aux
    fits = row_len if shifted else block_size  # unshifted rows leave their last column unused
    rows, cur = [], None
    for q, a in pairs:
        ids, mask, targets = encode_sample(task, tok, q, a)
        if len(ids) > fits:
            raise ValueError(f"{task.name}: {q!r} needs {len(ids)} tokens; block_size is {block_size}")
        if cur is None or not pack or len(cur[0]) + len(ids) > fits:
            cur = ([], [], [])
            rows.append(cur)
        cur[0].extend(ids)
        cur[1].extend(mask)
        cur[2].extend(targets or [])
    out = np.full((3, len(rows), row_len), PAD_ID, dtype=np.int64)  # ids, mask, targets
    for i, row in enumerate(rows):
        for k in range(3):
            out[k, i, :len(row[k])] = row[k]
    return out[0], out[1].astype(np.uint8), None if shifted else out[2]


def write_dataset(task, tok, out_dir, train_pairs, val_pairs, block_size, info):
    """The SFT layout of data.prepare_sft (meta.json, {split}.bin, {split}_mask.bin, tokenizer.json),
    plus {split}_targets.bin and "shifted": false where the targets are not the next tokens."""
    os.makedirs(out_dir, exist_ok=True)
    dtype = dtype_for_vocab(tok.vocab_size)
    rows = {}
    for split, pairs in (("train", train_pairs), ("val", val_pairs)):
        ids, mask, targets = encode_rows(task, tok, pairs, block_size, pack=task.pack)
        rows[split] = len(ids)
        ids.astype(dtype).tofile(os.path.join(out_dir, f"{split}.bin"))
        mask.tofile(os.path.join(out_dir, f"{split}_mask.bin"))
        if targets is not None:
            targets.astype(dtype).tofile(os.path.join(out_dir, f"{split}_targets.bin"))
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    blob = json.dumps({**info, "rows": rows, "block_size": block_size}, sort_keys=True).encode()
    meta = {"kind": "sft", "shifted": targets is None, "dtype": dtype, "vocab_size": tok.vocab_size,
            "block_size": block_size, "rows": rows, "tokenizer": "tokenizer.json", "problem": info,
            "fingerprint": hashlib.sha256(blob).hexdigest()}
    with open(os.path.join(out_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    return meta


# ---------------------------------------------------------------------------
# Decoding: the model's answers to many questions at once


@torch.no_grad()
def greedy_decode(model, prompts, max_new, eos_id=EOS_ID):
    """Greedy continuations of equal-length prompts ([B, T] tensor) with the KV cache: a list of
    token lists, each cut before its first <|eos|> (or at max_new tokens)."""
    B, T = prompts.shape
    max_new = min(max_new, model.cfg.block_size - T + 1)  # the last new token is never fed back
    decoder = Decoder(model, B, T + max_new - 1)  # model.generate's decode loop, B rows at one position
    logits = decoder.prefill(prompts)
    out = []
    done = torch.zeros(B, dtype=torch.bool, device=prompts.device)
    for i in range(max_new):
        nxt = logits.argmax(dim=-1)
        out.append(nxt)
        done |= nxt == eos_id
        if bool(done.all()) or i == max_new - 1:
            break
        logits = decoder.step(nxt, T + i)
    rows = torch.stack(out, dim=1).tolist()
    return [row[:row.index(eos_id)] if eos_id in row else row for row in rows]


@torch.no_grad()
def predict(model, task, tok, questions, batch_size=1000):
    """The model's answer (as shown, e.g. add's digits back in normal order) to every question.
    Prompts of equal length go together, so no padding ever shifts a position."""
    model.eval()
    device = model.tok_embeddings.weight.device
    by_len = defaultdict(list)
    encoded = [tok.encode(task.prompt(q)) for q in questions]
    for i, p in enumerate(encoded):
        by_len[len(p)].append(i)
    answers = [None] * len(questions)
    progress = tqdm(total=len(questions), desc="evaluating", unit=" questions", leave=False, mininterval=2)  # with an ETA
    for length, idx in by_len.items():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            if task.causal:
                x = torch.tensor([encoded[i] for i in chunk], device=device)
                outs = greedy_decode(model, x, model.cfg.block_size)
            else:  # placeholders where the answer goes; every answer digit from one forward pass
                n_ans = len(questions[chunk[0]])  # sort, reverse: as many answer digits as question digits
                holes = tok.encode(PLACEHOLDER * n_ans)
                x = torch.tensor([encoded[i] + holes for i in chunk], device=device)
                outs = model.one_pass(x)[:, length:length + n_ans].tolist()
            for i, out in zip(chunk, outs):
                answers[i] = task.answer_from_target(tok.decode(out))
            progress.update(len(chunk))
    progress.close()
    return answers


def evaluate(model, task, tok, pairs):
    """Exact match over (question, answer) pairs: (fraction right, per-size {size: (right, n)}, answers)."""
    answers = predict(model, task, tok, [q for q, _ in pairs])
    per_size = defaultdict(lambda: [0, 0])
    for (q, a), got in zip(pairs, answers):
        s = task.size(q) if task.size else 0
        per_size[s][0] += got == a
        per_size[s][1] += 1
    right = sum(r for r, _ in per_size.values())
    return right / len(pairs), {s: tuple(v) for s, v in sorted(per_size.items())}, answers


def majority_rate(pairs):
    """The chance baseline: how often the single most common answer is right."""
    return Counter(a for _, a in pairs).most_common(1)[0][1] / len(pairs)


# ---------------------------------------------------------------------------
# Runs: train + evaluate, or evaluate a checkpoint


def with_context(model, block_size):
    """The same weights with a longer context. Only for RoPE: its rotation tables are computed for
    any length, whereas learned positions have no embedding for a position never trained."""
    if block_size <= model.cfg.block_size or not model.cfg.use_rope:
        return model
    longer = Transformer(ModelConfig(**{**model.cfg.to_dict(), "block_size": block_size}))
    longer.load_state_dict(model.state_dict())
    return longer.to(model.tok_embeddings.weight.device).eval()


def report(task, model, tok, settings, test_size, show, out=print):
    """Evaluate on the held-out set (and add's longer lengths); print the table; return the results."""
    test = test_set(task, test_size, settings)
    t0 = time.time()
    acc, per_size, answers = evaluate(model, task, tok, test)
    result = {"test_samples": len(test), "exact_match": acc, "chance": majority_rate(test),
              "per_size": {str(s): v for s, v in per_size.items()}}
    out(f"{task.name}: exact match {100 * acc:.2f}% on {len(test):,} held-out samples "
        f"(chance, always the most common answer: {100 * result['chance']:.2f}%)")
    rows = [(s, r, n) for s, (r, n) in per_size.items()]
    if task.longer:
        longer = test_set(task, len(task.longer) * max(1, test_size // 10), settings, sizes=task.longer)
        l_acc, l_per_size, _ = evaluate(with_context(model, task.eval_block_size), task, tok, longer)
        result["longer"] = {"exact_match": l_acc, "per_size": {str(s): v for s, v in l_per_size.items()}}
        rows += [(s, r, n) for s, (r, n) in l_per_size.items()]
        out(f"  longer than trained ({', '.join(map(str, task.longer))} {task.size_name}): "
            f"exact match {100 * l_acc:.2f}% on {len(longer):,} samples")
    if task.size_name and len(rows) > 1:
        out(f"  {task.size_name:>6} | exact match | samples")
        for s, r, n in rows:
            mark = "  (longer than trained)" if s in task.longer else ""
            out(f"  {s:>6} | {100 * r / n:10.2f}% | {n:,}{mark}")
    result["eval_s"] = round(time.time() - t0, 1)
    if show:
        out(f"{show} held-out samples:")
        for (q, a), got in list(zip(test, answers))[:show]:
            out(f"  {'✓' if got == a else '✗'} {q}{task.separator}{got}" + ("" if got == a else f"   (expected {a})"))
        wrong = [(q, a, got) for (q, a), got in zip(test, answers) if got != a]
        if wrong:
            out(f"and {min(show, len(wrong))} of the {len(wrong):,} wrong answers:")
            for q, a, got in wrong[:show]:
                out(f"  ✗ {q}{task.separator}{got}   (expected {a})")
    return result


def run(task, args):
    out_dir = args.out or os.path.join("checkpoint", "problem", task.name)
    data_dir = args.data or os.path.join("dataset", "problem", task.name)
    tok = tokenizer_for(task)
    train_over = {k: v for k, v in dict(max_iters=args.steps, batch_size=args.batch_size,
                                        learning_rate=args.lr).items() if v is not None}
    tcfg = {**task.train, **train_over}
    if args.lr is not None:
        tcfg["min_lr"] = min(tcfg["min_lr"], args.lr / 10)
    steps, batch = tcfg["max_iters"], tcfg["batch_size"]

    # data: the test set first; training and validation samples may not repeat its questions
    t0 = time.time()
    test = test_set(task, args.test_size)
    exclude = {q for q, _ in test}
    n_val = 1000
    per_row = 1
    if task.pack:  # enough samples for steps x batch rows, each holding several
        probe, _ = train_samples(task, n_val, args.seed, exclude)
        per_row = (task.model["block_size"] + 1) / np.mean([len(encode_sample(task, tok, q, a)[0]) for q, a in probe])
    pairs, rejected = train_samples(task, int(steps * batch * per_row) + n_val, args.seed, exclude)
    train_pairs, val_pairs = pairs[n_val:], pairs[:n_val]
    assert not exclude & {q for q, _ in pairs}, "a test question leaked into the training data"
    info = {"task": task.name, "settings": task.settings, "seed": args.seed, "test_size": len(test),
            "train_samples": len(train_pairs), "val_samples": len(val_pairs), "rejected_test_collisions": rejected}
    block = task.model["block_size"]
    write_dataset(task, tok, data_dir, train_pairs, val_pairs, block, info)
    data_s = time.time() - t0
    print(f"{task.name}: {len(train_pairs):,} training samples ({rejected:,} draws rejected as test questions), "
          f"{len(val_pairs):,} validation, {len(test):,} test -> {data_dir} ({data_s:.1f} s)")

    model_cfg = ModelConfig(**{**task.model, "vocab_size": tok.vocab_size, "is_causal": task.causal})
    train_cfg = TrainConfig(mode="pretrain", data_dir=data_dir, out_dir=out_dir, device=args.device,
                            seed=args.seed, tensorboard=False, eval_interval=max(1, steps // 5), eval_iters=4,
                            log_interval=max(1, steps // 20), **tcfg)
    t1 = time.time()
    # problem.py makes its data and trains afresh each time: a rerun replaces the task's previous run
    model = train(model_cfg, train_cfg, quiet=args.quiet, overwrite=True)
    train_s = time.time() - t1
    os.makedirs(out_dir, exist_ok=True)
    problem = {**info, "data_dir": data_dir, "model_config": model_cfg.to_dict(), "steps": steps,
               "batch_size": batch, "train_s": round(train_s, 1)}
    result = report(task, model, tok, task.settings, args.test_size, args.show)
    wall = time.time() - PROCESS_START
    problem.update(result=result, wall_s=round(wall, 1))
    with open(os.path.join(out_dir, "problem.json"), "w", encoding="utf-8") as f:
        json.dump(problem, f, indent=1)
    print(f"{task.name}: {steps} steps of {batch} | wall time {wall:.0f} s (data {data_s:.0f} s, "
          f"training {train_s:.0f} s, evaluation {result['eval_s']:.0f} s) | {out_dir}/last.pt")
    return problem


def eval_checkpoint(task, args):
    ck = load_checkpoint(args.eval)
    path = os.path.join(os.path.dirname(args.eval), "problem.json")
    try:
        with open(path, encoding="utf-8") as f:
            problem = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the task this checkpoint was trained on ({e})") from None
    if problem.get("task") != task.name:
        raise ConfigError(f"{args.eval} was trained on task {problem.get('task')!r}, not {task.name!r}")
    tok = TrieTokenizer(ck["tokenizer"]["tokens"])
    model = model_from_checkpoint(ck, args.eval, args.device)
    result = report(task, model, tok, problem["settings"], args.test_size, args.show)
    print(f"{task.name}: {args.eval} (step {ck.get('step')}) | wall time {time.time() - PROCESS_START:.0f} s")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description="Train and evaluate a small model on a toy problem with exact answers.")
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument("--steps", type=int, help="training steps (default: the task's)")
    p.add_argument("--batch-size", type=int, help="samples per step (default: the task's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the task's)")
    p.add_argument("--seed", type=int, default=1337, help="training data and initialisation seed")
    p.add_argument("--out", help="checkpoint folder (default checkpoint/problem/TASK)")
    p.add_argument("--data", help="dataset folder (default dataset/problem/TASK)")
    p.add_argument("--eval", metavar="CKPT", help="evaluate this checkpoint instead of training")
    p.add_argument("--show", type=int, default=0, metavar="N", help="print N held-out samples with a check or a cross")
    p.add_argument("--test-size", type=int, default=10000, help="held-out samples (default 10,000)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    p.add_argument("--quiet", action="store_true", help="no training log lines")
    args = p.parse_args(argv)
    task = TASKS[args.task]
    try:
        return eval_checkpoint(task, args) if args.eval else run(task, args)
    except NanoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
