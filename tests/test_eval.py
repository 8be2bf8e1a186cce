"""eval.py against transformers as the oracle: every scored log-likelihood, the chosen answers, bits per
byte; the scores by hand on a small fixture; bad task files; a random-weight model at chance; the
eval_tasks keys of train.py.

The oracle is a small random Llama directory built with transformers and a byte-level BPE trained with
tokenizers (test_hf.py's builder), so nothing is downloaded. The task items are the first items of
each set in ../shared/data/eval (the tests fail, naming it, when it is absent)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import transformers  # noqa: E402  (test requirement: the oracle)

import eval as evaluation  # noqa: E402
from hf import load_checkpoint  # noqa: E402
from model import ModelConfig, Transformer, add_lora, adapter_checkpoint, model_from_checkpoint  # noqa: E402
from files import weights_fingerprint  # noqa: E402
from test_hf import FAMILY, train_bpe  # noqa: E402
from tokenizer import TrieTokenizer, tokenizer_from_dict  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_DIR = os.path.join(ROOT, "..", "shared", "data", "eval")
TASKS = ["arc_challenge", "arc_easy", "boolq", "commonsense_qa", "copa", "hellaswag", "lambada_openai",
         "openbook_qa", "piqa", "winograd_wsc", "winogrande"]


def shared_tasks():
    if not all(os.path.isfile(os.path.join(EVAL_DIR, f"{t}.jsonl")) for t in TASKS):
        pytest.fail(f"the eval sets are missing from {os.path.normpath(EVAL_DIR)} (../shared/data/eval: "
                    "see ../shared/README.md and docs/EVAL.md)")
    return EVAL_DIR


@pytest.fixture(scope="module")
def corpus():
    from corpus import default_corpus_documents
    return list(default_corpus_documents())[:200]


def make_llama(folder, texts, family="llama3", seed=0):
    """A random LlamaForCausalLM directory with its own tokenizer (test_hf's recipe, a longer context)."""
    torch.manual_seed(seed)
    tok = train_bpe(texts, family)
    f = FAMILY[family]
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size() + 8, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=384, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.2,
        eos_token_id=tok.token_to_id(f["eos"]), bos_token_id=tok.token_to_id(f["bos"]) if f["bos"] else None)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as fh:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": f["eos"], "bos_token": f["bos"],
                   "clean_up_tokenization_spaces": False}, fh)
    return model.eval()


@pytest.fixture(scope="module", params=["llama3", "chatml"])
def oracle(request, tmp_path_factory, corpus):
    """(folder, transformers model, transformers tokenizer): with a <bos> first (llama3) and without (chatml)."""
    folder = str(tmp_path_factory.mktemp(request.param))
    model = make_llama(folder, corpus, request.param)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"),
                                                  bos_token=FAMILY[request.param]["bos"])
    return folder, model, hf_tok


@pytest.fixture(scope="module")
def nano_checkpoint(tmp_path_factory, corpus):
    """A random Nano checkpoint with a trie tokenizer."""
    tok = TrieTokenizer.build(corpus, 800)
    torch.manual_seed(0)
    cfg = ModelConfig(block_size=256, vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                      n_hidden=128)
    path = str(tmp_path_factory.mktemp("nano") / "ckpt.pt")
    torch.save({"model": Transformer(cfg).state_dict(), "model_config": cfg.to_dict(), "tokenizer": tok.to_dict()}, path)
    return path


def nano_evaluator(folder, **kw):
    ck = load_checkpoint(folder)
    model = model_from_checkpoint(ck, folder).eval()
    return evaluation.Evaluator(evaluation.nano_forward(model), tokenizer_from_dict(ck["tokenizer"]),
                                model.cfg.block_size, progress=False, model=model, **kw)


@torch.no_grad()
def reference_loglik(model, hf_tok, context, continuation, block_size):
    """lm-eval-harness's recipe with transformers alone: encode context + continuation whole and the
    context alone (the tokenizer's own special tokens included), score the tokens after the context's
    count, one sequence at a time; a sequence past the context keeps its last block_size + 1 tokens."""
    whole = hf_tok(context + continuation)["input_ids"]
    n_context = len(hf_tok(context)["input_ids"])
    n = len(whole) - n_context
    whole = whole[-(block_size + 1):]
    n = min(n, len(whole) - 1)
    ids = torch.tensor([whole])
    logp = torch.log_softmax(model(ids[:, :-1]).logits.float(), dim=-1)[0]
    targets = ids[0, 1:]
    picked = logp[-n:].gather(1, targets[-n:, None])[:, 0]
    greedy = bool((logp[-n:].argmax(-1) == targets[-n:]).all())
    return float(picked.sum()), greedy, targets[-n:].tolist()


def test_every_loglik_and_answer_equals_transformers(oracle):
    folder, model, hf_tok = oracle
    ev = nano_evaluator(folder, batch_tokens=1024)  # several padded batches of mixed lengths
    tasks = evaluation.load_tasks(",".join(TASKS), shared_tasks(), limit=4)
    result = ev.evaluate(tasks)
    checked = shared = 0
    for task in tasks:
        req = ev.requests(task)
        seqs, n_scored = req.seqs, req.n_scored
        shared += len(req.groups)  # multiple-choice items scored from their query's KV cache
        refs = [reference_loglik(model, hf_tok, c, k, ev.block_size) for c, k, _ in evaluation.task_requests(task)]
        for seq, n, ref in zip(seqs, n_scored, refs):  # the scored tokens are transformers' tokens
            assert list(seq[-n:])[-len(ref[2]):] == ref[2]
        k = 0
        for item, got in zip(task.items, result["items"][task.name]):
            if task.kind == "lm":
                assert got["loglik"] == pytest.approx(refs[k][0], abs=1e-4)
                assert got["correct"] == refs[k][1]
                k += 1
            else:
                m = len(got["loglik"])
                want = [r[0] for r in refs[k:k + m]]
                np.testing.assert_allclose(got["loglik"], want, atol=1e-4, rtol=0)
                assert got["pred"] == int(np.argmax(want))  # the same answer
                k += m
            checked += 1
    assert checked == 44 and shared == 32  # the eight multiple-choice sets' items, each through the shared prefix


def join_items(corpus):
    """(tokenizer, task): the Bible's trie tokenizer plus a token that spans a query and one of its choices
    (" God sa": greedy longest match then reads "And God said" as "And", " God sa", "id", where the query
    alone is "And", " God"), and items whose choices share the query's tokens, do not (that join), and
    run past a 256-token context."""
    base = TrieTokenizer.build(corpus, 600)
    tok = TrieTokenizer(base.tokens + [" God sa"])
    long_query = " ".join(corpus[7].split()[:300])
    items = [{"query": "And God", "choices": ["made", "said", "saw"], "gold": 1},
             {"query": "In the beginning", "choices": ["God created", "was the Word", "darkness"], "gold": 0},
             {"query": long_query, "choices": ["and the earth", "and the sea."], "gold": 0},
             {"query": long_query, "choices": ["yes", "no"], "gold": 1},
             {"query": "Question: Who led Israel out of Egypt?\nAnswer:", "choices": ["Moses", "Pharaoh"], "gold": 0}]
    return tok, evaluation.Task("join", "join.jsonl", "choice", items)


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_shared_prefix_scores_equal_unshared_item_by_item(corpus, chat):
    """A multiple-choice item's query forwarded once and its choices from the KV cache give every
    request's log-likelihood of the one-request-a-row scoring (float32, within 1e-5), on crafted items
    (a join that tokenises differently falls back to unshared scoring; queries past the context) and on
    the first items of the eight multiple-choice sets; and forward fewer tokens."""
    tok, task = join_items(corpus)
    assert tok.encode("And God said")[:2] != tok.encode("And God")  # the fixture merges across the join
    torch.manual_seed(0)
    model = Transformer(ModelConfig(block_size=256, vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4,
                                    n_kv_head=2, n_hidden=128)).eval()
    shared = evaluation.Evaluator(evaluation.nano_forward(model), tok, 256, progress=False, chat=chat, model=model,
                                  batch_tokens=1024)
    alone = evaluation.Evaluator(evaluation.nano_forward(model), tok, 256, progress=False, chat=chat, model=model,
                                 batch_tokens=1024, shared_prefix=False)
    choice_sets = ["arc_challenge", "arc_easy", "boolq", "commonsense_qa", "copa", "hellaswag", "openbook_qa", "piqa"]
    tasks = [task] + evaluation.load_tasks(",".join(choice_sets), shared_tasks(), limit=12)
    n_shared = {}
    for t in tasks:
        req = shared.requests(t)
        assert alone.requests(t).groups == []
        if t is task:
            item_of = [i for i, item in enumerate(t.items) for _ in item["choices"]]
            grouped = {item_of[members[0]] for _, members in req.groups}
            # the join that merges falls back (a chat reply is tokenised on its own: no join to merge)
            assert (0 in grouped) == chat and {1, 4} <= grouped, req.groups
            assert any(len(s) > 257 for s in req.seqs)  # queries cut to the context
        else:
            n_shared[t.name] = len(req.groups)
        a, b = shared.run_task(t)[1], alone.run_task(t)[1]
        for x, y in zip(a, b):
            np.testing.assert_allclose(x["loglik"], y["loglik"], atol=1e-5, rtol=0)
            assert (x["pred"], x["pred_norm"]) == (y["pred"], y["pred_norm"])
    # (BoolQ's passages run past this context, and "yes" and "no" of different lengths cut them apart)
    assert sum(n_shared.values()) >= 0.8 * 12 * len(choice_sets), n_shared
    assert shared.forwarded["tokens"] < 0.7 * alone.forwarded["tokens"], (shared.forwarded, alone.forwarded)


def test_shared_prefix_is_the_cpu_default_and_either_flag_chooses():
    """By default the KV-cache sharing runs on the CPU only (on a GPU the one-request-a-row batches are
    faster: docs/EVAL.md); --shared-prefix and --no-shared-prefix choose on any device, not both."""
    model = Transformer(ModelConfig(block_size=32, vocab_size=64, n_layer=1, n_embd=32, n_head=4, n_kv_head=2,
                                    n_hidden=64)).eval()

    def sharing(device, flags):
        args = evaluation.parse_args(["-m", "x.pt", *flags])
        ev = evaluation.Evaluator(evaluation.nano_forward(model), None, 32, device, progress=False, model=model,
                                  shared_prefix=args.shared_prefix)
        return ev.model is not None

    assert sharing("cpu", []) and not sharing("cuda", []) and not sharing("cuda:1", [])
    assert sharing("cuda", ["--shared-prefix"]) and not sharing("cpu", ["--no-shared-prefix"])
    with pytest.raises(SystemExit):
        evaluation.parse_args(["-m", "x.pt", "--shared-prefix", "--no-shared-prefix"])


def test_shared_prefix_under_bf16_autocast(corpus):
    """The cache in the autocast dtype: under bf16 autocast (the GPU's setting, here on the CPU) the shared
    scores equal the unshared ones within bf16's rounding, and pick the same answers where the margin is
    wider than that."""
    tok, task = join_items(corpus)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(block_size=256, vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4,
                                    n_kv_head=2, n_hidden=128)).eval()
    runs = [evaluation.Evaluator(evaluation.nano_forward(model), tok, 256, progress=False, model=model,
                                 autocast=torch.autocast("cpu", dtype=torch.bfloat16), shared_prefix=on)
            for on in (True, False)]
    tasks = [task] + evaluation.load_tasks("hellaswag,piqa", shared_tasks(), limit=10)
    for t in tasks:
        assert runs[0].requests(t).groups
        a, b = (ev.run_task(t)[1] for ev in runs)
        for x, y in zip(a, b):
            np.testing.assert_allclose(x["loglik"], y["loglik"], rtol=0.02, atol=0.05)


def test_scores_by_hand_on_a_small_fixture(oracle, tmp_path):
    folder, model, hf_tok = oracle
    mc = [{"query": "Question: What did God make first?", "choices": ["light", "the sea", "darkness"], "gold": 0},
          {"query": "And the earth was", "choices": [" without form", " full"], "gold": 0},
          {"query": "The Lord is my", "choices": ["shepherd", "king", "song", "rock"], "gold": 3}]
    schema = [{"context_options": ["Moses spoke to Aaron because Moses", "Moses spoke to Aaron because Aaron"],
               "continuation": "was listening.", "gold": 1},
              {"context_options": ["David fought Goliath and David", "David fought Goliath and Goliath"],
               "continuation": "won.", "gold": 0}]
    lm = [{"context": "In the beginning God created the heavens and the", "continuation": "earth"},
          {"context": "Let there be", "continuation": "light"}]
    for name, rows in (("mc", mc), ("wsc", schema), ("lam", lm)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    ev = nano_evaluator(folder)
    result = ev.evaluate(evaluation.load_tasks("mc,wsc,lam", str(tmp_path)))
    # by hand, from transformers' log-likelihoods
    ll = lambda c, k: reference_loglik(model, hf_tok, *evaluation.split_text(c, " ", k), 10 ** 6)  # noqa: E731
    mc_ll = [[ll(r["query"], c)[0] for c in r["choices"]] for r in mc]
    chars = [[len(c.strip()) for c in r["choices"]] for r in mc]
    acc = np.mean([np.argmax(v) == r["gold"] for v, r in zip(mc_ll, mc)])
    acc_norm = np.mean([np.argmax(np.array(v) / c) == r["gold"] for v, c, r in zip(mc_ll, chars, mc)])
    chance = (1 / 3 + 1 / 2 + 1 / 4) / 3
    s = result["tasks"]["mc"]
    assert (s["n"], s["acc"], s["acc_norm"], s["chance"]) == (3, pytest.approx(acc), pytest.approx(acc_norm),
                                                               pytest.approx(chance))
    assert s["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / 2))
    assert s["centred"] == pytest.approx((acc_norm - chance) / (1 - chance))
    wsc_acc = np.mean([np.argmax([ll(o, r["continuation"])[0] for o in r["context_options"]]) == r["gold"] for r in schema])
    assert result["tasks"]["wsc"]["acc"] == pytest.approx(wsc_acc)
    assert result["tasks"]["wsc"]["centred"] == pytest.approx((wsc_acc - 0.5) / 0.5)
    lam = [ll(r["context"], r["continuation"]) for r in lm]
    assert result["tasks"]["lam"]["acc"] == pytest.approx(np.mean([g for _, g, _ in lam]))
    assert result["tasks"]["lam"]["perplexity"] == pytest.approx(math.exp(-np.mean([v for v, _, _ in lam])), rel=1e-4)
    assert result["tasks"]["lam"]["centred"] == pytest.approx(result["tasks"]["lam"]["acc"])  # chance 0
    assert result["centred"] == pytest.approx(np.mean([result["tasks"][t]["centred"] for t in ("mc", "wsc", "lam")]))


def test_summary_arithmetic_by_hand():
    task = evaluation.Task("t", "t.jsonl", "choice", [{"choices": ["a", "b"]}, {"choices": ["a", "b", "c", "d"]},
                                                        {"choices": ["a", "b", "c", "d"]}])
    results = [{"correct": True, "correct_norm": True}, {"correct": True, "correct_norm": False},
               {"correct": False, "correct_norm": False}]
    s = evaluation.summarize(task, results)
    assert s["acc"] == pytest.approx(2 / 3) and s["acc_norm"] == pytest.approx(1 / 3)
    assert s["acc_stderr"] == pytest.approx(math.sqrt(2 / 9 / 2))  # sqrt(p (1 - p) / (n - 1))
    assert s["chance"] == pytest.approx((1 / 2 + 1 / 4 + 1 / 4) / 3)
    assert s["centred"] == pytest.approx((1 / 3 - 1 / 3) / (1 - 1 / 3))


def test_join_rules_follow_the_published_definitions():
    split = evaluation.split_text
    # a space between query and choice; the space goes with the continuation (lm-eval)
    assert split("The capital of France is", " ", "Paris") == ("The capital of France is", " Paris")
    # HellaSwag's endings carry their own leading space: one space, not two
    assert split("A man is sitting on a roof. he", " ", " starts pulling") == ("A man is sitting on a roof. he",
                                                                              " starts pulling")
    # Eval Gauntlet's "\nAnswer: " (ARC, PIQA, BoolQ); PIQA's queries end with a newline
    assert split("Question: How?\n", "\nAnswer: ", "glue it") == ("Question: How?\n\nAnswer:", " glue it")
    assert split("Question: Which?", "\nAnswer: ", "a rock") == ("Question: Which?\nAnswer:", " a rock")
    assert split("trailing space ", " ", "x") == ("trailing space", " x")
    assert evaluation.DELIMITERS == {t: "\nAnswer: " for t in ("arc_easy", "arc_challenge", "piqa", "boolq")}
    task = evaluation.Task("copa", "copa.jsonl", "choice",
                           [{"query": "The man turned on the faucet, therefore", "choices": ["water flowed."], "gold": 0}])
    assert evaluation.task_requests(task) == [("The man turned on the faucet, therefore", " water flowed.", 13)]


def test_nano_framing_puts_bos_first_and_scores_the_continuation(corpus):
    tok = TrieTokenizer.build(corpus, 600)
    seqs, n = evaluation.encode_requests(tok, [("And God said", " Let there be light", 18)])
    assert seqs[0][0] == tok.bos_id
    assert tok.decode(seqs[0][-n[0]:]) == " Let there be light"
    assert seqs[0] == [tok.bos_id] + tok.encode("And God said Let there be light")


def test_chat_framing_is_a_user_turn_and_the_reply(corpus):
    tok = TrieTokenizer.build(corpus, 600)
    seqs, n = evaluation.encode_requests(tok, [("Question: Who built the ark?\nAnswer:", " Noah", 4)], chat=True)
    want = [tok.bos_id, tok.instruct_id] + tok.encode("Question: Who built the ark?\nAnswer:") + [tok.response_id]
    assert seqs[0] == want + tok.encode("Noah") and n == [len(tok.encode("Noah"))]


BAD_ITEMS = [
    ("not json", "{\"query\": \"q\", ", "not JSON"),
    ("a list", "[1, 2]", "must be a JSON object"),
    ("no known keys", '{"question": "q", "answer": 1}', "needs the keys query/choices/gold"),
    ("missing gold", '{"query": "q", "choices": ["a", "b"]}', "needs the key gold"),
    ("missing choices", '{"query": "q", "gold": 0}', "needs the key choices"),
    ("schema without continuation", '{"context_options": ["a", "b"], "gold": 0}', "needs the key continuation"),
    ("lm without continuation", '{"context": "c"}', "needs the key continuation"),
    ("empty choices", '{"query": "q", "choices": [], "gold": 0}', "got an empty list"),
    ("one choice", '{"query": "q", "choices": ["a"], "gold": 0}', "at least two strings"),
    ("choices not a list", '{"query": "q", "choices": "ab", "gold": 0}', "must be a list"),
    ("empty choice", '{"query": "q", "choices": ["a", " "], "gold": 0}', "choices[1] must be a non-empty string"),
    ("number choice", '{"query": "q", "choices": ["a", 3], "gold": 0}', "choices[1] must be a non-empty string"),
    ("gold out of range", '{"query": "q", "choices": ["a", "b"], "gold": 2}', "gold 2 is out of range for 2 choices"),
    ("negative gold", '{"query": "q", "choices": ["a", "b"], "gold": -1}', "gold -1 is out of range"),
    ("gold a string", '{"query": "q", "choices": ["a", "b"], "gold": "0"}', "gold must be an integer"),
    ("gold a bool", '{"query": "q", "choices": ["a", "b"], "gold": true}', "gold must be an integer"),
    ("schema gold", '{"context_options": ["a", "b"], "continuation": "c", "gold": 5}', "out of range for 2 context_options"),
    ("query not text", '{"query": 1, "choices": ["a", "b"], "gold": 0}', "query must be a string"),
    ("empty continuation", '{"context": "c", "continuation": ""}', "continuation is empty"),
    ("mixed shapes", '{"context": "c", "continuation": "d"}', "a lm item in a file of choice items"),
]


@pytest.mark.parametrize("name,line,message", BAD_ITEMS, ids=[b[0] for b in BAD_ITEMS])
def test_bad_task_files_are_one_line_naming_file_and_line(tmp_path, name, line, message):
    path = tmp_path / "bad.jsonl"
    good = '{"query": "q", "choices": ["a", "b"], "gold": 1}'
    path.write_text(f"{good}\n\n{line}\n{good}\n")  # the blank line is skipped, but counted
    with pytest.raises(evaluation.EvalError) as e:
        evaluation.read_task(str(path))
    text = str(e.value)
    assert text.startswith(f"{path}:3: ") and message in text and "\n" not in text


def test_bad_files_folders_and_names_through_the_command_line(tmp_path, nano_checkpoint):
    folder = nano_checkpoint
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "latin1.jsonl").write_bytes('{"context": "caf\xe9", "continuation": "x"}\n'.encode("latin-1"))
    (tmp_path / "gold.jsonl").write_text('{"query": "q", "choices": ["a", "b"], "gold": 7}\n')
    cases = [(["--tasks", "empty", "--tasks-dir", str(tmp_path)], f"{tmp_path}/empty.jsonl: no items"),
             (["--tasks", "latin1", "--tasks-dir", str(tmp_path)], "latin1.jsonl: not UTF-8 text"),
             (["--tasks", "gold", "--tasks-dir", str(tmp_path)], "gold.jsonl:1: gold 7 is out of range"),
             (["--tasks", "nope", "--tasks-dir", str(tmp_path)], "unknown task 'nope'"),
             (["--tasks-dir", str(tmp_path / "none")], "docs/EVAL.md"),
             (["--tasks", "x.jsonl"], "task file x.jsonl not found"),
             (["--bpb", str(tmp_path / "missing.txt")], "cannot read"),
             (["--bpb", str(tmp_path)], "holds no meta.json")]
    for argv, message in cases:
        r = subprocess.run([sys.executable, "eval.py", "-m", folder, "--no-progress"] + argv, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, (argv, r.stderr)
        assert r.stderr.startswith("error: ") and message in r.stderr, (argv, r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


def test_bits_per_byte_equals_transformers_over_windows(oracle, tmp_path, corpus):
    folder, model, hf_tok = oracle
    text = "\n".join(corpus[3:6])[:3000]  # past the 384-token context: several windows
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    ev = nano_evaluator(folder, batch_tokens=512)
    got = ev.bits_per_byte(evaluation.text_file_ids(ev.tok, str(path)))
    ids = hf_tok(text)["input_ids"]  # the tokenizer's own framing (a <bos> for llama3), then the text
    if hf_tok.bos_token is None:  # none (chatml): the end-of-text token first, as lm-eval-harness does
        ids = [model.config.eos_token_id] + ids
    T, total = ev.block_size, 0.0
    assert len(ids) > 2 * T
    with torch.no_grad():
        for s in range(0, len(ids) - 1, T):
            w = torch.tensor([ids[s:s + T + 1]])
            logp = torch.log_softmax(model(w[:, :-1]).logits.float(), -1)[0]
            total += float(logp.gather(1, w[0, 1:, None]).sum())
    want = -total / math.log(2) / len(text.encode("utf-8"))
    assert got["bytes"] == len(text.encode("utf-8"))
    assert got["bits_per_byte"] == pytest.approx(want, rel=1e-5)


def test_dataset_bits_per_byte_and_the_tokenizer_check(tmp_path, corpus):
    from data import prepare_pretrain
    src = tmp_path / "docs.txt"
    src.write_text("\n\n".join(corpus[:60]), encoding="utf-8")
    data_dir = tmp_path / "ds"
    prepare_pretrain([str(src)], str(data_dir), vocab_size=300, val_ratio=0.1, doc_sep="blankline", workers=1,
                     progress=False)
    tok = tokenizer_from_dict(json.loads((data_dir / "tokenizer.json").read_text()))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(block_size=64, vocab_size=320, n_layer=1, n_embd=32, n_head=2, n_kv_head=1,
                                    n_hidden=48)).eval()
    ev = evaluation.Evaluator(evaluation.nano_forward(model), tok, 64, progress=False)
    ids = evaluation.dataset_val_ids(tok, str(data_dir))
    got = ev.bits_per_byte(ids)
    # by hand: every non-special target, its log-likelihood in one unbatched forward per window
    specials = set(evaluation.special_ids(tok))
    assert {tok.bos_id, tok.eos_id} <= specials
    total, text_ids = 0.0, []
    with torch.no_grad():
        for s in range(0, len(ids) - 1, 64):
            w = torch.tensor(np.asarray(ids[s:s + 65], dtype=np.int64))[None]
            logp = torch.log_softmax(model(w[:, :-1])[0].float(), -1)[0]
            for t, target in enumerate(w[0, 1:].tolist()):
                if target not in specials:
                    total += float(logp[t, target])
                    text_ids.append(target)
    n_bytes = len(tok.decode(text_ids).encode("utf-8"))
    assert got["bytes"] == n_bytes and got["tokens"] == len(text_ids)
    assert got["bits_per_byte"] == pytest.approx(-total / math.log(2) / n_bytes, rel=1e-6)
    other = TrieTokenizer.build(corpus[100:160], 300)
    with pytest.raises(evaluation.EvalError, match="another tokenizer than the model's"):
        evaluation.dataset_val_ids(other, str(data_dir))


def test_random_weights_sit_at_chance(corpus, tmp_path):
    """Where the scored text is the same for every option (schema: one continuation after each context),
    an untrained model has no preference: it sits at chance within three standard errors; and it never
    guesses a LAMBADA word."""
    folder = shared_tasks()
    tok = TrieTokenizer.build(corpus, 2000)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(block_size=256, vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4,
                                    n_kv_head=2, n_hidden=128)).eval()
    ev = evaluation.Evaluator(evaluation.nano_forward(model), tok, 256, progress=False)
    result = ev.evaluate(evaluation.load_tasks("winogrande,winograd_wsc", folder)
                         + evaluation.load_tasks("lambada_openai", folder, limit=300))
    for name in ("winogrande", "winograd_wsc"):
        s = result["tasks"][name]
        assert s["n"] > 250 and s["chance"] == 0.5
        assert abs(s["acc"] - 0.5) < 3 * s["acc_stderr"], s
    assert result["tasks"]["lambada_openai"]["acc"] == 0


def test_an_adapter_scores_as_its_merged_model(nano_checkpoint, tmp_path):
    """A Nano checkpoint, the same with an adapter (-l), and the two merged, through the command line."""
    from merge_lora import merged_checkpoint
    from model import LoRAConfig
    base = load_checkpoint(nano_checkpoint)
    torch.save(base, tmp_path / "base.pt")
    model = model_from_checkpoint(base, nano_checkpoint)
    add_lora(model, LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)  # B starts at zero: make the adapter change something
    torch.save(adapter_checkpoint(model, base["model_config"], weights_fingerprint(base["model_config"], base["model"])),
               tmp_path / "adapter.pt")
    torch.save(merged_checkpoint(base, str(tmp_path / "base.pt"), str(tmp_path / "adapter.pt")), tmp_path / "merged.pt")
    task = ["--tasks", "copa,winograd_wsc", "--tasks-dir", shared_tasks(), "--limit", "20", "--no-progress",
            "--details", "--json", "-"]
    out = {}
    for name, extra in (("base", []), ("adapter", ["-l", str(tmp_path / "adapter.pt")]), ("merged", [])):
        path = tmp_path / ("base.pt" if name != "merged" else "merged.pt")
        r = subprocess.run([sys.executable, "eval.py", "-m", str(path)] + extra + task, cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        out[name] = json.loads(r.stdout[r.stdout.index("{"):])
    lls = {k: [v for t in o["items"].values() for item in t for v in item["loglik"]] for k, o in out.items()}
    np.testing.assert_allclose(lls["adapter"], lls["merged"], atol=1e-4, rtol=0)
    assert np.abs(np.array(lls["adapter"]) - np.array(lls["base"])).max() > 1e-2
    assert out["adapter"]["adapter"].endswith("adapter.pt") and set(out["adapter"]["tasks"]) == {"copa", "winograd_wsc"}


def test_train_logs_task_scores_and_bits_per_byte(tmp_path, corpus):
    import train
    from data import prepare_pretrain
    from files import ConfigError
    src = tmp_path / "docs.txt"
    src.write_text("\n\n".join(corpus[:40]), encoding="utf-8")
    prepare_pretrain([str(src)], str(tmp_path / "ds"), vocab_size=300, val_ratio=0.1, doc_sep="blankline",
                     workers=1, progress=False)
    task = tmp_path / "mini.jsonl"
    task.write_text("".join(json.dumps({"query": f"Question {i}", "choices": ["yes", "no"], "gold": i % 2}) + "\n"
                            for i in range(8)))
    settings = dict(data_dir=str(tmp_path / "ds"), out_dir=str(tmp_path / "run"), max_iters=2, eval_interval=1,
                    eval_iters=1, batch_size=2, device="cpu", tensorboard=True, warmup_iters=0, log_interval=1,
                    eval_tasks=f"{task},{shared_tasks()}/copa.jsonl", eval_limit=5)
    cfg = train.TrainConfig(**settings)
    model_cfg = ModelConfig(block_size=32, vocab_size=320, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, n_hidden=48)
    train.train(model_cfg, cfg, quiet=False)
    lines = [line for line in (tmp_path / "run" / "train.log").read_text().splitlines() if "task/" in line]
    assert len(lines) == 2 and all("task/mini" in line and "task/copa" in line and "tasks/centred" in line
                                   and "val/bits_per_byte" in line for line in lines)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    assert {"task/mini", "task/copa", "tasks/centred", "val/bits_per_byte"} <= set(acc.Tags()["scalars"])
    for bad, message in ((dict(eval_tasks="copa,nope"), "eval_tasks: unknown task 'nope'"),
                         (dict(eval_limit=0), "eval_limit must be positive")):
        with pytest.raises(ConfigError, match=message):
            train.TrainConfig(**{**settings, **bad}).validate()
