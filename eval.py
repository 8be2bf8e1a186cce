"""
How good is a model? Zero-shot task accuracy and bits per byte, for every model Nano loads.

    python eval.py -m checkpoint/pretrain/best.pt                       # all tasks in ../shared/data/eval
    python eval.py -m ckpt.pt --tasks hellaswag,arc_easy --limit 500    # some tasks, their first 500 items
    python eval.py -m base.pt -l checkpoint/lora/adapter.pt --json out.json
    python eval.py -m ~/models/SmolLM2-135M --bpb ../shared/data/tinyshakespeare.txt dataset/pretrain

Models load as infer.py loads them (hf.load_checkpoint: a Nano checkpoint, a Hugging Face model
directory; -l an adapter on its base) and run through model.py's one forward.

Tasks are JSONL files in the layout of the CORE / Eval Gauntlet bundle (docs/EVAL.md says where to
get it), one task a file, named by the file; each line is an item of one of three shapes:

  {"query", "choices", "gold"}              multiple choice: the log-likelihood of each choice after
                                            the query; the highest wins
  {"context_options", "continuation", "gold"}  schema (Winograd): the log-likelihood of the one
                                            continuation after each context; the highest wins
  {"context", "continuation"}               language modelling (LAMBADA): right when greedy decoding
                                            gives the continuation exactly; also its perplexity

Scoring (docs/EVAL.md has the details and the sources):
* A context and its continuation are joined with the task's delimiter, Eval Gauntlet's: "\\nAnswer: "
  for arc_easy, arc_challenge, piqa and boolq, a space for every other task. Where the context
  already ends, or the continuation already starts, with whitespace (HellaSwag's endings), the
  delimiter's own trailing space is dropped, so there is one separator, never two.
* The text is tokenised whole and split as lm-eval-harness does: the context's trailing
  whitespace moves to the continuation (" Paris", not "Paris" after "is "), context + continuation
  is encoded in one piece, the context alone is encoded, and the continuation's tokens are the whole's
  tokens after the context's count. So the scored tokens are those the model would read, even where a
  tokenizer merges across the boundary. The model's own framing comes first (Nano: <|bos|>; a Hugging
  Face model: whatever its tokenizer's pipeline puts before a text, as infer.py frames a prompt).
* acc: the choice of highest summed log-likelihood. acc_norm: the highest log-likelihood per
  character of the choice (lm-eval-harness's acc_norm; the delimiter not counted). Ties go to the
  first choice. stderr: sqrt(p (1 - p) / (n - 1)), lm-eval's sample standard error.
* centred: (score - chance) / (1 - chance), CORE's centring, where score is acc_norm for multiple
  choice and acc otherwise and chance is 1/choices averaged over the items (0 for LAMBADA); the
  aggregate is the mean over the tasks run.
* LAMBADA perplexity: exp(-mean over items of log p(continuation | context)), lm-eval's.

Bits per byte: the model's total negative log-likelihood in bits over the UTF-8 bytes of the text it
predicts, so that models with different tokenizers compare. Of a text file (the model's framing,
then the text), or of a dataset's validation split (data.py's val.bin, which must be of the model's
tokenizer). The stream is cut into windows of block_size + 1 tokens that overlap by one token, so
every token but the first is predicted once, from the start of its window. Special tokens (<|bos|>,
<|eos|>, <|unknown|>, a Hugging Face tokenizer's special tokens) neither count nor add bytes.

Speed: on the CPU a multiple-choice item's query is forwarded once into model.py's KV cache and its
choices continue from it as a batch (shared_prefix_groups says when, and why it is exact). On a GPU
every request goes in its own row instead: there the continuations' explicit attention mask and the
per-choice copies of the cache cost more than the repeated queries (all eleven sets on an H200: 27.3 s
of scoring shared, 8.9 s unshared; on the 2-core CPU sharing saves 9%). --shared-prefix and
--no-shared-prefix choose either way on any device. The other requests are sorted by length and run
as right-padded batches of about --batch-tokens tokens through the causal forward (no cache: right
padding changes nothing before it). Under bf16 autocast on a GPU; only the scored positions' logits
go through log_softmax, in float32.
"""

import argparse
import glob
import json
import math
import os
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from files import ConfigError, DataError, NanoError, read_json
from infer import chat_ids, load, prompt_ids
from tokenizer import SPECIAL_TOKENS, tokenizer_from_dict

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TASKS_DIR = os.path.join(ROOT, "..", "shared", "data", "eval")
# Eval Gauntlet's continuation delimiters (mosaicml/llm-foundry scripts/eval/yamls/tasks_v0.3.yaml):
# these tasks put "\nAnswer: " between question and answer, every other task a space
DELIMITERS = {"arc_easy": "\nAnswer: ", "arc_challenge": "\nAnswer: ", "piqa": "\nAnswer: ", "boolq": "\nAnswer: "}
DEFAULT_DELIMITER = " "
SHAPES = {"choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
          "lm": ("context", "continuation")}
GET_BUNDLE = ("the eleven sets come from mosaicml/llm-foundry's scripts/eval/local_data (the CORE / Eval "
              "Gauntlet bundle; docs/EVAL.md says how to fetch them): give their folder with --tasks-dir")


class EvalError(NanoError):
    """A task file, task name or evaluation setting that cannot be used."""


# ---------------------------------------------------------------------------
# Task files


@dataclass
class Task:
    name: str
    path: str
    kind: str  # choice | schema | lm
    items: list  # the JSON objects, checked


def _check_item(obj, where):
    """The item's shape (choice, schema, lm), or EvalError naming the problem at `where` (file:line)."""
    if not isinstance(obj, dict):
        raise EvalError(f"{where}: an item must be a JSON object, got {type(obj).__name__}")
    kind = "choice" if "choices" in obj or "query" in obj else "schema" if "context_options" in obj \
        else "lm" if "context" in obj else None
    if kind is None:
        raise EvalError(f"{where}: an item needs the keys query/choices/gold (multiple choice), "
                        f"context_options/continuation/gold (schema) or context/continuation (LAMBADA); it has "
                        f"{', '.join(sorted(obj)) or 'none'}")
    missing = [k for k in SHAPES[kind] if k not in obj]
    if missing:
        raise EvalError(f"{where}: a {kind} item needs the key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    options_key = {"choice": "choices", "schema": "context_options"}.get(kind)
    if options_key:
        options = obj[options_key]
        if not isinstance(options, list) or len(options) < 2:
            got = "an empty list" if options == [] else json.dumps(options)[:60]
            raise EvalError(f"{where}: {options_key} must be a list of at least two strings, got {got}")
        bad = [i for i, o in enumerate(options) if not isinstance(o, str) or not o.strip()]
        if bad:
            raise EvalError(f"{where}: {options_key}[{bad[0]}] must be a non-empty string, got {json.dumps(options[bad[0]])[:60]}")
        gold = obj["gold"]
        if not isinstance(gold, int) or isinstance(gold, bool):
            raise EvalError(f"{where}: gold must be an integer index, got {json.dumps(gold)[:60]}")
        if not 0 <= gold < len(options):
            raise EvalError(f"{where}: gold {gold} is out of range for {len(options)} {options_key}")
    text_keys = {"choice": ("query",), "schema": ("continuation",), "lm": ("context", "continuation")}[kind]
    for key in text_keys:
        if not isinstance(obj[key], str):
            raise EvalError(f"{where}: {key} must be a string, got {json.dumps(obj[key])[:60]}")
    if kind != "choice" and not obj["continuation"].strip():
        raise EvalError(f"{where}: continuation is empty")
    return kind


def read_task(path, limit=None):
    """A Task from a JSONL file (its first `limit` items), every item checked: a bad one is an
    EvalError naming the file and line."""
    name = os.path.splitext(os.path.basename(path))[0]
    items, kind = [], None
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if limit is not None and len(items) >= limit:
                    break
                if not line.strip():
                    continue  # a blank line (a trailing newline) is no item
                where = f"{path}:{number}"
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as e:
                    raise EvalError(f"{where}: not JSON ({getattr(e, 'msg', 'nested too deeply')})") from None
                shape = _check_item(obj, where)
                if kind is not None and shape != kind:
                    raise EvalError(f"{where}: a {shape} item in a file of {kind} items (one shape a file)")
                kind = shape
                items.append(obj)
    except UnicodeDecodeError as e:
        raise EvalError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise EvalError(f"cannot read task file {path}: {e.strerror or e}") from None
    if not items:
        raise EvalError(f"{path}: no items")
    return Task(name, path, kind, items)


def find_tasks(names, tasks_dir=None):
    """[(name, path)] for names ("all", or a comma-separated list of task names in tasks_dir and/or
    paths of .jsonl files)."""
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    if not names or any(not n for n in names):
        raise EvalError(f"tasks: expected task names separated by commas, got {','.join(names)!r}")
    wanted = [n for n in names if not n.endswith(".jsonl")]
    found = []
    if wanted:
        folder = tasks_dir or DEFAULT_TASKS_DIR
        if not os.path.isdir(folder):
            raise EvalError(f"no task folder at {os.path.normpath(folder)}: {GET_BUNDLE}")
        available = {os.path.splitext(os.path.basename(p))[0]: p for p in sorted(glob.glob(os.path.join(folder, "*.jsonl")))}
        if not available:
            raise EvalError(f"{os.path.normpath(folder)} holds no .jsonl task files: {GET_BUNDLE}")
    for n in names:
        if n.endswith(".jsonl"):
            if not os.path.isfile(n):
                raise EvalError(f"task file {n} not found")
            found.append((os.path.splitext(os.path.basename(n))[0], n))
        elif n == "all":
            found += list(available.items())
        elif n in available:
            found.append((n, available[n]))
        else:
            raise EvalError(f"unknown task {n!r} in {os.path.normpath(folder)} (there: {', '.join(available)})")
    return list(dict(found).items())  # each once, in the order given


def load_tasks(names, tasks_dir=None, limit=None):
    return [read_task(path, limit) for _, path in find_tasks(names, tasks_dir)]


# ---------------------------------------------------------------------------
# Requests: which text is scored after which


def split_text(context, delimiter, continuation):
    """(context text, continuation text) for a context and a continuation joined by a delimiter: one
    separator where a side already has whitespace (a continuation that starts with a space drops the
    delimiter's trailing spaces, a context that ends with whitespace its leading ones), and the
    context's trailing whitespace moved to the continuation (lm-eval-harness's rule)."""
    if continuation[:1].isspace():
        delimiter = delimiter.rstrip(" ")
    if context[-1:].isspace():
        delimiter = delimiter.lstrip(" ")
    context += delimiter
    stem = context.rstrip()
    return stem, context[len(stem):] + continuation


def task_requests(task):
    """[(context, continuation, scored characters)] for every option of every item, item by item:
    multiple choice: the query then each choice; schema: each context then the continuation;
    LAMBADA: the context then the continuation."""
    delimiter = DELIMITERS.get(task.name, DEFAULT_DELIMITER)
    out = []
    for item in task.items:
        if task.kind == "choice":
            pairs = [(item["query"], choice) for choice in item["choices"]]
        elif task.kind == "schema":
            pairs = [(option, item["continuation"]) for option in item["context_options"]]
        else:
            pairs = [(item["context"].rstrip(), item["continuation"])]  # (Eval Gauntlet trims LAMBADA's context)
        for context, continuation in pairs:
            out.append(split_text(context, delimiter, continuation) + (len(continuation.strip()),))
    return out


def framing_ids(tok, prompt_format=None):
    """The tokens before a text: the model's own framing as infer.py frames a prompt (Nano: <|bos|>; a
    Hugging Face model: what its tokenizer's pipeline puts first, Llama 3's <|begin_of_text|>), and
    where that is nothing (Qwen2, a 2024.10 model), its begin-of-text token if it has one, else its
    end-of-text token (lm-eval-harness's prefix token), so that the text's first token is predicted too."""
    return prompt_ids(tok, "", False, prompt_format) or [tok.bos_id if tok.bos_id is not None else tok.eos_id]


def encode_many(tok, texts):
    """tok.encode of each text, through the tokenizer's own batch call where it has one (the same ids,
    in its threads)."""
    if tok.kind == "bpe":
        return tok.enc.encode_batch(texts, allowed_special="all")
    if tok.kind == "hf":
        return [e.ids for e in tok.tok.encode_batch(texts, add_special_tokens=False)]
    return [tok.encode(t) for t in texts]


def encode_requests(tok, requests, prompt_format=None, chat=False):
    """Token sequences and how many of their last tokens are scored, for (context, continuation, _)
    requests: framing + the whole text's tokens, the scored ones after the context's count.
    chat: the context is a user message in the model's chat framing (infer.chat_ids) and the
    continuation its reply, tokenised on its own."""
    unique = sorted({r[0] for r in requests})
    if chat:
        context_ids = {c: chat_ids(tok, [{"role": "user", "content": c.strip()}], prompt_format) for c in unique}
        replies = encode_many(tok, [r[1].lstrip() for r in requests])
        return [context_ids[r[0]] + ids for r, ids in zip(requests, replies)], [len(ids) for ids in replies]
    prefix = prompt_ids(tok, "", False, prompt_format)  # <|bos|>, or what a Hugging Face pipeline puts first
    fallback = framing_ids(tok, prompt_format)
    context_ids = dict(zip(unique, encode_many(tok, unique)))
    wholes = encode_many(tok, [r[0] + r[1] for r in requests])
    seqs, n_scored = [], []
    for (context, continuation, _), whole in zip(requests, wholes):
        n = len(whole) - len(context_ids[context])
        if n <= 0:  # the boundary merge swallowed the continuation: score its own tokens
            whole = context_ids[context] + tok.encode(continuation)
            n = len(whole) - len(context_ids[context])
        # something must come before the first scored token (an empty context)
        seqs.append((prefix if prefix or n < len(whole) else fallback) + whole)
        n_scored.append(n)
    return seqs, n_scored


# ---------------------------------------------------------------------------
# Scoring: log-likelihoods in padded batches


def nano_forward(model):
    """The logits function of a Nano model: model.py's forward."""
    return lambda x: model(x)[0]


def special_ids(tok):
    """Ids of tokens that are not text (framing, padding, <|unknown|>): bits per byte skips them."""
    if tok.kind == "hf":
        return sorted(i for i, t in tok.tok.get_added_tokens_decoder().items() if t.special)
    ids = [getattr(tok, f"{name}_id", None) for name in ("pad", "unk", "bos", "eos", "instruct", "response")]
    if tok.kind == "bpe":
        ids.append(tok.enc.encode_single_token("<|endoftext|>"))
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def score(forward, seqs, n_scored, block_size, device="cpu", autocast=nullcontext(), batch_tokens=8192,
          ignore_ids=(), progress=None, stats=None):
    """For each token sequence, the summed log-likelihood of its last n_scored tokens (float64), and
    whether greedy decoding gives every one of them; a sequence longer than block_size + 1 keeps its
    last block_size + 1 tokens. Targets in ignore_ids count for nothing (bits per byte).
    forward: [B, T] ids -> [B, T, vocab] logits (nano_forward, or another model's for comparison).
    stats: a Counter that gets what was forwarded (count_forward)."""
    n = len(seqs)
    lengths = np.array([min(len(s), block_size + 1) for s in seqs])
    order = np.argsort(-lengths, kind="stable")  # longest first: a batch pads to its first row
    totals, misses, done = [], [], []
    ignore = torch.tensor(sorted(ignore_ids), dtype=torch.long, device=device)
    i = 0
    while i < n:
        width = int(lengths[order[i]]) - 1
        width = min(-(-width // 16) * 16, block_size)  # a few distinct shapes (compile), aligned
        rows = order[i:i + max(1, batch_tokens // width)]
        i += len(rows)
        x = np.zeros((len(rows), width), dtype=np.int64)
        counts = np.empty(len(rows), dtype=np.int64)
        ends = np.empty(len(rows), dtype=np.int64)
        targets = []
        for r, j in enumerate(rows):
            s = seqs[j][-(block_size + 1):]
            x[r, :len(s) - 1] = s[:-1]
            counts[r] = min(n_scored[j], len(s) - 1)
            ends[r] = len(s) - 1
            targets.append(np.asarray(s[len(s) - counts[r]:], dtype=np.int64))
        total = int(counts.sum())
        row_of = np.repeat(np.arange(len(rows)), counts)
        # position of each scored target's prediction: from end - count to end - 1 in its row
        col_of = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(ends - counts, counts)
        row_t, col_t = torch.from_numpy(row_of).to(device), torch.from_numpy(col_of).to(device)
        tgt = torch.from_numpy(np.concatenate(targets)).to(device)
        with autocast:
            logits = forward(torch.from_numpy(x).to(device))
        count_forward(stats, len(rows), int(ends.sum()), x.size)
        picked = logits[row_t, col_t].float()
        token_ll = torch.log_softmax(picked, dim=-1).gather(1, tgt[:, None])[:, 0].double()
        miss = (picked.argmax(dim=-1) != tgt).double()
        if len(ignore):
            keep = ~torch.isin(tgt, ignore)
            token_ll, miss = token_ll * keep, miss * keep
        totals.append(torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row_t, token_ll))
        misses.append(torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row_t, miss))
        done.append(rows)
        if progress is not None:
            progress.update(len(rows))
    loglik, greedy = np.zeros(n), np.zeros(n, dtype=bool)
    if done:
        where = np.concatenate(done)
        loglik[where] = torch.cat(totals).cpu().numpy()
        greedy[where] = torch.cat(misses).cpu().numpy() == 0
    return loglik, greedy


def count_forward(stats, rows, tokens, slots):
    """Add one forward to stats (a Counter, or None): its rows, its real tokens, and its slots (rows x
    width: the tokens plus the padding)."""
    if stats is not None:
        stats.update(forwards=1, rows=rows, tokens=tokens, slots=slots)


# Shared prefixes. A multiple-choice item's choices all follow one query; scored one request a row, the
# query is forwarded once per choice (HellaSwag's context 4 times, BoolQ's passage twice). Instead the
# prefix (framing + query) is forwarded once into model.py's KV cache, and the item's choices continue
# from it as one batch, each in its own copy of the prefix's cache rows at the prefix's end: the
# per-row positions of Transformer.forward that serve.py decodes with. Why the cache and not one packed
# row (prefix, then every choice, a mask keeping the choices apart): the cache is model.py's as it
# is, where a packed row would need an attention mask and positions per token in the one forward.
# Exact, not approximate: an item shares its prefix only when every choice's tokens before its scored
# ones are the same tokens. Where tokenising query + choice merges across the join, so that the whole
# does not start with the query's own tokens (or starts differently for some choice), the item is
# scored as before, each request in its own row (as lm-eval-harness, which shares a context only where
# the tokens agree). Requests longer than the context are compared as score() cuts them (their last
# block_size + 1 tokens): BoolQ's long passages share a prefix when "yes" and "no" cut them alike.


def split_scored(seq, n_scored, block_size):
    """(the tokens before the scored ones, the scored ones) of a request as score() forwards it: its last
    block_size + 1 tokens, of which at most all but the first are scored."""
    s = list(seq[-(block_size + 1):])
    n = min(n_scored, len(s) - 1)
    return s[:len(s) - n], s[len(s) - n:]


def shared_prefix_groups(task, seqs, n_scored, block_size):
    """[(prefix ids, [request index, ...])]: the multiple-choice items whose requests all have the same
    tokens before their scored ones; every other request is scored in its own row."""
    if task.kind != "choice":
        return []  # schema: one continuation after different contexts; LAMBADA: one request an item
    groups, k = [], 0
    for item in task.items:
        members = list(range(k, k + len(item["choices"])))
        k += len(members)
        prefixes = {tuple(split_scored(seqs[j], n_scored[j], block_size)[0]) for j in members}
        if len(prefixes) == 1:
            groups.append((list(prefixes.pop()), members))
    return groups


@torch.no_grad()
def score_shared(cached_forward, make_cache, groups, seqs, n_scored, block_size, device="cpu",
                 autocast=nullcontext(), batch_tokens=8192, progress=None, stats=None):
    """score()'s two arrays for the requests of shared_prefix_groups, in the groups' order of requests:
    each group's prefix forwarded once into a KV cache, then every request's scored tokens but the last
    from its own copy of that cache. Groups are batched longest prefix first, right-padded (padding
    after a row's own tokens is never attended to: the prefix forward is causal, and the
    continuations' queries see cache positions up to their own only).
    cached_forward(ids [B, T], cache, pos) -> logits (model.py's forward with cache= and pos=);
    make_cache(rows, max_len, dtype) -> a cache (Transformer.make_cache)."""
    conts = [[np.asarray(split_scored(seqs[j], n_scored[j], block_size)[1], dtype=np.int64) for j in members]
             for _, members in groups]
    order = sorted(range(len(groups)), key=lambda g: -len(groups[g][0]))  # a batch pads to its first prefix
    dev = torch.device(device).type
    results, i = {}, 0
    while i < len(order):
        width = len(groups[order[i]][0])
        batch, n_rows, cont_width = [], 0, 0  # cont_width: continuation tokens fed after the prefix
        for g in order[i:]:
            w = max(cont_width, max(len(c) for c in conts[g]) - 1)
            rows = n_rows + len(conts[g])
            if batch and ((len(batch) + 1) * width + rows * w > batch_tokens or width + w > block_size):
                break
            batch.append(g)
            n_rows, cont_width = rows, w
        i += len(batch)
        prefix_len = np.array([len(groups[g][0]) for g in batch])
        x = np.zeros((len(batch), width), dtype=np.int64)
        for r, g in enumerate(batch):
            x[r, :prefix_len[r]] = groups[g][0]
        rows = [c for g in batch for c in conts[g]]
        owner = np.repeat(np.arange(len(batch)), [len(conts[g]) for g in batch])  # each row's prefix
        owner_t = torch.from_numpy(owner).to(device)
        fed = np.array([len(c) - 1 for c in rows])
        with autocast:
            # the cache in the dtype the forward computes k and v in: the same values the unshared rows attend
            # to (none when every choice is one token, BoolQ's "yes" and "no": the prefix's logits score it)
            cache = make_cache(len(batch), width + cont_width, torch.get_autocast_dtype(dev)
                               if torch.is_autocast_enabled(dev) else None) if cont_width else None
            logits = cached_forward(torch.from_numpy(x).to(device), cache, 0)
            count_forward(stats, len(batch), int(prefix_len.sum()), x.size)
            # each row's first scored token is predicted at its prefix's last position
            picked = [logits[owner_t, torch.from_numpy(prefix_len - 1).to(device)[owner_t]]]
            if cont_width:
                y = np.zeros((len(rows), cont_width), dtype=np.int64)
                for r, c in enumerate(rows):
                    y[r, :len(c) - 1] = c[:-1]
                cache = [(k[owner_t], v[owner_t]) for k, v in cache]  # the prefix's rows, one copy per choice
                logits = cached_forward(torch.from_numpy(y).to(device), cache,
                                        torch.from_numpy(prefix_len[owner]).to(device))
                count_forward(stats, len(rows), int(fed.sum()), y.size)
                row_of = np.repeat(np.arange(len(rows)), fed)
                col_of = np.arange(fed.sum()) - np.repeat(np.cumsum(fed) - fed, fed)
                picked.append(logits[torch.from_numpy(row_of).to(device), torch.from_numpy(col_of).to(device)])
        picked = torch.cat(picked).float()
        row_t = torch.from_numpy(np.concatenate([np.arange(len(rows)), np.repeat(np.arange(len(rows)), fed)])).to(device)
        tgt = torch.from_numpy(np.concatenate([[c[0] for c in rows]] + [c[1:] for c in rows])).to(device)
        token_ll = torch.log_softmax(picked, dim=-1).gather(1, tgt[:, None])[:, 0].double()
        miss = (picked.argmax(dim=-1) != tgt).double()
        total = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row_t, token_ll)
        missed = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row_t, miss)
        results.update(zip(batch, np.split(np.stack([total.cpu().numpy(), missed.cpu().numpy()]),
                                           np.cumsum([len(conts[g]) for g in batch])[:-1], axis=1)))
        if progress is not None:
            progress.update(len(rows))
    if not groups:
        return np.zeros(0), np.zeros(0, dtype=bool)
    both = np.concatenate([results[g] for g in range(len(groups))], axis=1)
    return both[0], both[1] == 0


# ---------------------------------------------------------------------------
# Results: per item, per task, overall


def stderr(p, n):
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def item_results(task, loglik, greedy, chars):
    """Per item: the options' log-likelihoods and the predictions, from the flat per-request arrays
    (in task_requests' order)."""
    out, k = [], 0
    for item in task.items:
        if task.kind == "lm":
            out.append({"loglik": float(loglik[k]), "correct": bool(greedy[k])})
            k += 1
            continue
        m = len(item["choices"] if task.kind == "choice" else item["context_options"])
        lls = loglik[k:k + m]
        result = {"loglik": [float(v) for v in lls], "pred": int(np.argmax(lls)), "gold": item["gold"]}
        result["correct"] = result["pred"] == item["gold"]
        if task.kind == "choice":
            result["pred_norm"] = int(np.argmax(lls / np.maximum(chars[k:k + m], 1)))
            result["correct_norm"] = result["pred_norm"] == item["gold"]
        out.append(result)
        k += m
    return out


def summarize(task, results):
    """A task's scores: n, acc (+ stderr), acc_norm (+ stderr; multiple choice), perplexity (LAMBADA),
    chance and the centred score."""
    n = len(results)
    acc = sum(r["correct"] for r in results) / n
    s = {"kind": task.kind, "n": n, "acc": acc, "acc_stderr": stderr(acc, n)}
    if task.kind == "choice":
        s["acc_norm"] = sum(r["correct_norm"] for r in results) / n
        s["acc_norm_stderr"] = stderr(s["acc_norm"], n)
    if task.kind == "lm":
        s["perplexity"] = math.exp(-sum(r["loglik"] for r in results) / n)
        s["chance"] = 0.0
    else:
        s["chance"] = sum(1 / len(item["choices" if task.kind == "choice" else "context_options"])
                          for item in task.items) / n
    primary = s["acc_norm"] if task.kind == "choice" else acc
    s["centred"] = (primary - s["chance"]) / (1 - s["chance"])
    return s


def centred_mean(summaries):
    """CORE's aggregate: the mean of the tasks' centred scores."""
    return sum(s["centred"] for s in summaries.values()) / len(summaries) if summaries else float("nan")


@dataclass
class Requests:
    """A task's requests, tokenised: the token sequences, how many of their last tokens are scored, the
    scored characters (acc_norm), and the groups that share a prefix (shared_prefix_groups)."""
    seqs: list
    n_scored: list
    chars: np.ndarray
    groups: list


class Evaluator:
    """A model, its tokenizer and how to run it: evaluate(tasks) and bits_per_byte(ids).
    forward: [B, T] ids -> logits. model: the Nano Transformer behind it, whose KV cache scores a
    multiple-choice item's shared prefix once (shared_prefix=False, or no model: every request in its
    own row; None: on the CPU only, see the module's "Speed"). forwarded: what the forwards were given
    so far (count_forward)."""

    def __init__(self, forward, tok, block_size, device="cpu", autocast=nullcontext(), batch_tokens=None,
                 prompt_format=None, chat=False, progress=True, model=None, shared_prefix=None):
        self.forward, self.tok, self.block_size, self.device = forward, tok, block_size, device
        self.autocast, self.prompt_format, self.chat, self.progress = autocast, prompt_format, chat, progress
        self.batch_tokens = max(batch_tokens or (32768 if torch.device(device).type == "cuda" else 4096), block_size)
        if shared_prefix is None:
            shared_prefix = torch.device(device).type == "cpu"
        # a bidirectional model's positions see the padding after them: no cache path for it
        self.model = model if shared_prefix and model is not None and model.cfg.is_causal else None
        self.cached_forward = lambda x, cache, pos: model(x, cache=cache, pos=pos)[0]
        self.forwarded = Counter()

    def _bar(self, total, desc):
        if not self.progress:
            return None
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit="seq", leave=False, file=sys.stderr, dynamic_ncols=True)

    def requests(self, task):
        reqs = task_requests(task)
        seqs, n_scored = encode_requests(self.tok, reqs, self.prompt_format, self.chat)
        groups = shared_prefix_groups(task, seqs, n_scored, self.block_size) if self.model is not None else []
        return Requests(seqs, n_scored, np.array([r[2] for r in reqs], dtype=np.float64), groups)

    def score_requests(self, req, progress=None):
        """(summed log-likelihoods, greedy exactness) of every request: the shared groups through the
        cache, the others one a row."""
        n = len(req.seqs)
        loglik, greedy = np.zeros(n), np.zeros(n, dtype=bool)
        groups = req.groups if self.model is not None else []  # (another Evaluator's requests may have some)
        shared = [j for _, members in groups for j in members]
        alone = np.setdiff1d(np.arange(n), shared)
        if len(alone):
            loglik[alone], greedy[alone] = score(
                self.forward, [req.seqs[j] for j in alone], [req.n_scored[j] for j in alone], self.block_size,
                self.device, self.autocast, self.batch_tokens, progress=progress, stats=self.forwarded)
        if shared:
            loglik[shared], greedy[shared] = score_shared(
                self.cached_forward, self.model.make_cache, groups, req.seqs, req.n_scored, self.block_size,
                self.device, self.autocast, self.batch_tokens, progress=progress, stats=self.forwarded)
        return loglik, greedy

    def run_task(self, task):
        """(summary, per-item results) of one task."""
        req = self.requests(task)
        bar = self._bar(len(req.seqs), task.name)
        try:
            loglik, greedy = self.score_requests(req, bar)
        finally:
            if bar is not None:
                bar.close()
        results = item_results(task, loglik, greedy, req.chars)
        summary = summarize(task, results)
        summary["truncated"] = sum(len(s) > self.block_size + 1 for s in req.seqs)
        return summary, results

    def evaluate(self, tasks):
        """{"tasks": {name: summary}, "centred": mean, "items": per task's item results}."""
        summaries, items = {}, {}
        for task in tasks:
            summaries[task.name], items[task.name] = self.run_task(task)
        return {"tasks": summaries, "centred": centred_mean(summaries), "items": items}

    def bits_per_byte(self, ids, max_tokens=None):
        """Bits per UTF-8 byte of the text a token stream (framing included) spells: windows of
        block_size + 1 tokens overlapping by one; special tokens neither count nor add bytes."""
        ids = ids.cpu().numpy() if torch.is_tensor(ids) else np.asarray(ids)  # (train.py's may be on the GPU)
        if max_tokens is not None:
            ids = ids[:max_tokens + 1]
        if len(ids) < 2:
            raise EvalError("bits per byte needs at least two tokens")
        T = self.block_size
        windows = [ids[s:s + T + 1] for s in range(0, len(ids) - 1, T)]
        specials = special_ids(self.tok)
        bar = self._bar(len(windows), "bits per byte")
        try:
            loglik, _ = score(self.forward, windows, [len(w) - 1 for w in windows], T, self.device, self.autocast,
                              self.batch_tokens, ignore_ids=specials, progress=bar, stats=self.forwarded)
        finally:
            if bar is not None:
                bar.close()
        text_ids = ids[1:][~np.isin(ids[1:], specials)]
        n_bytes = len(self.tok.decode(text_ids.tolist()).encode("utf-8"))
        if n_bytes == 0:
            raise EvalError("bits per byte: the tokens spell no text")
        return {"bits_per_byte": -float(loglik.sum()) / math.log(2) / n_bytes, "bytes": n_bytes,
                "tokens": int(len(text_ids))}


# ---------------------------------------------------------------------------
# Bits-per-byte sources: a text file or a dataset's validation split


def text_file_ids(tok, path, prompt_format=None):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise EvalError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise EvalError(f"cannot read {path}: {e.strerror or e}") from None
    return framing_ids(tok, prompt_format) + tok.encode(text)


def dataset_val_ids(tok, folder):
    """A data.py dataset's val.bin, after checking it is of the model's tokenizer."""
    from data import load_meta, load_tokens  # (data.py and its dependencies only when a dataset is asked for)
    if not os.path.isfile(os.path.join(folder, "meta.json")):
        raise EvalError(f"{folder} holds no meta.json: --bpb takes text files and dataset folders written by data.py")
    try:
        raw = read_json(os.path.join(folder, "meta.json"), "dataset meta", DataError)
        kind = raw.get("kind", "pretrain") if isinstance(raw, dict) else "pretrain"
        if kind != "pretrain":
            raise EvalError(f"{folder} is a {kind} dataset: bits per byte reads a pretraining dataset's val.bin")
        meta = load_meta(folder)
        spec = read_json(os.path.join(folder, meta["tokenizer"]), "dataset tokenizer", DataError)
    except NanoError as e:
        raise EvalError(str(e)) from None
    if spec != tok.to_dict():
        raise EvalError(f"{folder} was tokenized with another tokenizer than the model's: its val.bin means other "
                        f"text to this model (bits per byte of a text file works with any model)")
    return load_tokens(folder, "val", meta)


# ---------------------------------------------------------------------------
# During training (train.py: train-config keys eval_tasks, eval_limit)


def during_training(model, tok, tasks, autocast, val_ids=None, max_tokens=None):
    """Scores of a training model on its task sample (tasks loaded with load_tasks, limit applied) and,
    given val_ids, bits per byte on them: {"task/NAME": centred score, ..., "tasks/centred": mean,
    "val/bits_per_byte": x} for train.log and TensorBoard."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        ev = Evaluator(nano_forward(model), tok, model.cfg.block_size, device, autocast, progress=False, model=model)
        result = ev.evaluate(tasks)
        out = {f"task/{name}": s["acc_norm" if s["kind"] == "choice" else "acc"] for name, s in result["tasks"].items()}
        out["tasks/centred"] = result["centred"]
        if val_ids is not None:
            out["val/bits_per_byte"] = ev.bits_per_byte(val_ids, max_tokens)["bits_per_byte"]
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------------------
# Command line


def format_table(result):
    head = f"{'task':<16} {'kind':<7} {'n':>6} {'acc':>7} {'±':>6} {'acc_norm':>8} {'±':>6} {'chance':>7} {'centred':>8}  other"
    lines = [head, "-" * len(head)]
    for name, s in result["tasks"].items():
        norm = f"{s['acc_norm']:8.4f} {s['acc_norm_stderr']:6.4f}" if "acc_norm" in s else f"{'':8} {'':6}"
        other = f"perplexity {s['perplexity']:.4g}" if "perplexity" in s else ""
        if s.get("truncated"):
            other += f" ({s['truncated']} requests cut to the context)"
        lines.append(f"{name:<16} {s['kind']:<7} {s['n']:>6} {s['acc']:7.4f} {s['acc_stderr']:6.4f} {norm} "
                     f"{s['chance']:7.4f} {s['centred']:8.4f}  {other}".rstrip())
    lines.append(f"centred mean over {len(result['tasks'])} task(s) (CORE-style: (score - chance) / (1 - chance), "
                 f"score = acc_norm for multiple choice, else acc): {result['centred']:.4f}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Zero-shot task accuracy and bits per byte (docs/EVAL.md)")
    p.add_argument("-m", "--model", required=True, help="checkpoint (.pt) or a Hugging Face model directory")
    p.add_argument("-l", "--lora", help="LoRA adapter checkpoint to attach to the model")
    p.add_argument("--tasks", help="all (default), or task names / .jsonl paths separated by commas")
    p.add_argument("--tasks-dir", help=f"folder of task .jsonl files (default {os.path.normpath(DEFAULT_TASKS_DIR)})")
    p.add_argument("--limit", type=int, help="the first N items of each task")
    p.add_argument("--bpb", nargs="+", metavar="PATH", default=[],
                   help="bits per byte of text files and/or data.py dataset folders (their val.bin); alone, no tasks run")
    p.add_argument("--bpb-tokens", type=int, help="at most this many tokens of each --bpb source")
    p.add_argument("--chat", action="store_true",
                   help="frame each context as a user message in the model's chat framing, the continuation as its reply")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON (- for stdout)")
    p.add_argument("--details", action="store_true", help="--json: include every item's log-likelihoods")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="autocast dtype (auto: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--batch-tokens", type=int, help="tokens per batch (default 32768 on a GPU, 4096 on the CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward (bench/bench_eval.py measures it)")
    sharing = p.add_mutually_exclusive_group()
    sharing.add_argument("--shared-prefix", dest="shared_prefix", action="store_true", default=None,
                         help="forward a multiple-choice item's query once and its choices from its KV cache "
                              "(the default on the CPU)")
    sharing.add_argument("--no-shared-prefix", dest="shared_prefix", action="store_false",
                         help="forward every (query, choice) request in its own row (the default on a GPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for flag, value in (("--limit", args.limit), ("--batch-tokens", args.batch_tokens), ("--bpb-tokens", args.bpb_tokens)):
        if value is not None and value <= 0:
            p.error(f"{flag} must be positive, got {value}")
    return args


def setup(args):
    """(Evaluator, tasks, bpb sources) for the command line; every input checked before any scoring."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--device {device}: no CUDA device here")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise EvalError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    run_tasks = args.tasks is not None or not args.bpb
    tasks = load_tasks(args.tasks or "all", args.tasks_dir, args.limit) if run_tasks else []
    model, tok, _ = load(argparse.Namespace(model=args.model, lora=args.lora, device=device))
    prompt_format = getattr(model, "prompt_format", None)
    sources = []
    for path in args.bpb:
        if os.path.isdir(path):
            sources.append((path, dataset_val_ids(tok, path)))
        else:
            sources.append((path, text_file_ids(tok, path, prompt_format)))
    dtype = args.dtype if args.dtype != "auto" else "bfloat16" if device.startswith("cuda") else "float32"
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    ev = Evaluator(nano_forward(model), tok, model.cfg.block_size, device, autocast, args.batch_tokens, prompt_format,
                   args.chat, progress=not args.no_progress, model=model, shared_prefix=args.shared_prefix)
    if args.compile:
        ev.forward = torch.compile(ev.forward, dynamic=True)
        ev.cached_forward = torch.compile(ev.cached_forward, dynamic=True)
    return ev, tasks, sources


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        ev, tasks, sources = setup(args)
        result = ev.evaluate(tasks) if tasks else {"tasks": {}, "centred": float("nan"), "items": {}}
        result["bits_per_byte"] = {path: ev.bits_per_byte(ids, args.bpb_tokens) for path, ids in sources}
    except (NanoError, ValueError) as e:  # ValueError: a check of model.py's on the checkpoint
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    seconds = time.perf_counter() - t0
    n_items = sum(s["n"] for s in result["tasks"].values())
    if result["tasks"]:
        print(format_table(result))
    for path, b in result["bits_per_byte"].items():
        print(f"bits per byte of {path}: {b['bits_per_byte']:.4f} ({b['tokens']:,} tokens, {b['bytes']:,} bytes)")
    done = f"{n_items:,} items in {seconds:.1f} s ({n_items / seconds:,.0f} items/s)" if n_items else f"{seconds:.1f} s"
    print(f"{done} on {ev.device}, start-up included; {ev.forwarded['tokens']:,} tokens forwarded in "
          f"{ev.forwarded['rows']:,} rows", file=sys.stderr)
    if args.json:
        out = {"model": args.model, "adapter": args.lora, "tasks": result["tasks"], "centred": result["centred"],
               "bits_per_byte": result["bits_per_byte"], "seconds": seconds, "device": str(ev.device),
               "delimiters": {t.name: DELIMITERS.get(t.name, DEFAULT_DELIMITER) for t in tasks}, "chat": args.chat,
               "shared_prefix": ev.model is not None, "forwarded": dict(ev.forwarded)}
        if args.details:
            out["items"] = result["items"]
        text = json.dumps(out, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main()
