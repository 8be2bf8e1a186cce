"""Hugging Face models in and out (hf.py), against transformers and tokenizers as oracles.

The tests build their own tiny random models with transformers and a small byte-level BPE with
tokenizers trained on the default corpus, so nothing is downloaded."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

import transformers  # noqa: E402  (test requirement: the oracle)
import tokenizers  # noqa: E402,F401

import hf  # noqa: E402
import infer  # noqa: E402
from files import ConfigError  # noqa: E402
from hf import load_checkpoint  # noqa: E402
from model import model_from_checkpoint  # noqa: E402
from tokenizer import tokenizer_from_dict  # noqa: E402
from locked_make import make  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# chat templates in the two families' forms (ChatML with a default system message, as Qwen2.5's and
# SmolLM2's; Llama 3's header form with trimmed contents), rendered by transformers' jinja
CHATML = ("{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}"
          "{%- endif %}{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content']"
          " + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>'"
          " + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0"
          " == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt"
          " %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
FAMILY = {
    "chatml": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>",
                   template=CHATML, pattern=None),
    "llama3": dict(specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>"], bos="<|begin_of_text|>", eos="<|eot_id|>", template=LLAMA3,
                   pattern=r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                           r"|\s*[\r\n]+|\s+(?!\S)|\s+"),
}


@pytest.fixture(scope="module")
def corpus():
    from corpus import default_corpus_documents
    docs = list(default_corpus_documents())
    return [d for d in docs[:200]]


def train_bpe(texts, family, vocab_size=600):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    f = FAMILY[family]
    tok = Tokenizer(models.BPE())
    if f["pattern"]:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(f["pattern"]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=f["specials"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if f["bos"]:  # Llama 3's pipeline puts <|begin_of_text|> before a document
        tok.post_processor = processors.TemplateProcessing(
            single=f"{f['bos']} $A", special_tokens=[(f["bos"], tok.token_to_id(f["bos"]))])
    return tok


def make_hf_model(folder, arch, family, texts, tied=False, seed=0, layers=2):
    torch.manual_seed(seed)
    tok = train_bpe(texts, family)
    f = FAMILY[family]
    common = dict(vocab_size=tok.get_vocab_size() + 8, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                  rope_theta=50000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied, initializer_range=0.2,
                  eos_token_id=tok.token_to_id(f["eos"]), bos_token_id=tok.token_to_id(f["bos"]) if f["bos"] else None)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    with torch.no_grad():  # biases and norms away from their init values, so that they are tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": f["eos"], "chat_template": f["template"],
              "clean_up_tokenization_spaces": False, "bos_token": f["bos"]}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as fh:
        json.dump(config, fh)
    return model.eval()


CASES = [("llama", "llama3", False), ("llama", "llama3", True), ("qwen2", "chatml", False), ("qwen2", "chatml", True)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{'tied' if c[2] else 'untied'}")
def hf_model(request, tmp_path_factory, corpus):
    arch, family, tied = request.param
    folder = tmp_path_factory.mktemp(f"{arch}{int(tied)}")
    model = make_hf_model(str(folder), arch, family, corpus, tied=tied)
    return str(folder), model, family


def test_import_gives_transformers_logits_with_and_without_the_cache(hf_model):
    folder, ref, _ = hf_model
    ck = load_checkpoint(folder)  # a directory is accepted where a checkpoint is
    model = model_from_checkpoint(ck, folder).eval()
    assert model.cfg.tie_embeddings == ref.config.tie_word_embeddings
    ids = torch.randint(0, ref.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got, _ = model(ids)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        cache = model.make_cache(2, 40)  # the KV cache: a prefix, then one token at a time
        parts = [model(ids[:, :25], cache=cache, pos=0)[0]]
        parts += [model(ids[:, t:t + 1], cache=cache, pos=t)[0] for t in range(25, 40)]
        torch.testing.assert_close(torch.cat(parts, 1), want, atol=1e-4, rtol=0)
        prompt = ids[0, :10].tolist()
        want_ids = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 10, dtype=torch.long),
                                max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 10:].tolist()
    assert model.generate(prompt, max_new_tokens=20, temperature=0) == want_ids


@pytest.mark.parametrize("family", list(FAMILY))
def test_tokenizer_ids_equal_the_tokenizers_library(family, tmp_path, corpus):
    from tokenizers import Tokenizer
    from tests.test_bpe_c import make_strings  # the BPE issue's set of varied strings
    folder = str(tmp_path)
    make_hf_model(folder, "llama" if family == "llama3" else "qwen2", family, corpus, layers=1)
    ours = tokenizer_from_dict(load_checkpoint(folder)["tokenizer"])
    theirs = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    strings = [s for s in make_strings(set()) if not any(0xD800 <= ord(c) < 0xE000 for c in s)]
    assert len(strings) >= 5000  # (a lone surrogate is no text the tokenizers library takes)
    for s in strings:
        assert ours.encode(s) == theirs.encode(s, add_special_tokens=False).ids, s
        assert ours.encode_document(s) == theirs.encode(s).ids
    f = FAMILY[family]
    assert ours.eos_id == theirs.token_to_id(f["eos"])
    assert ours.bos_id == (theirs.token_to_id(f["bos"]) if f["bos"] else None)


CONVERSATIONS = [
    [{"role": "user", "content": "Who made the heavens?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "  In the beginning?  "}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
     {"role": "user", "content": "And then, 123 days later?"}],
]


def test_chat_framing_equals_apply_chat_template(hf_model):
    folder, _, _ = hf_model
    tok = tokenizer_from_dict(load_checkpoint(folder)["tokenizer"])
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    for messages in CONVERSATIONS:
        want = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tok.chat_text(messages) == want
        want_ids = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        want_ids = want_ids["input_ids"] if isinstance(want_ids, dict) or hasattr(want_ids, "keys") else want_ids
        assert infer.chat_ids(tok, messages) == list(want_ids)


def test_infer_chats_with_the_template_and_stops_at_the_turn_end(hf_model):
    folder, ref, family = hf_model
    tok = tokenizer_from_dict(load_checkpoint(folder)["tokenizer"])
    r = subprocess.run([sys.executable, "infer.py", "-m", folder, "-i", "--prompt", "Who made the heavens?", "-t", "0",
                        "-n", "12"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    prompt = infer.chat_ids(tok, CONVERSATIONS[0])
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           max_new_tokens=12, do_sample=False, pad_token_id=0,
                           eos_token_id=tok.stop_ids)[0, len(prompt):].tolist()
    out = [i for i in out if i not in tok.stop_ids]
    assert r.stdout.rstrip("\n") == tok.decode(out)


def test_export_round_trip_through_transformers(hf_model, tmp_path):
    import export
    folder, ref, _ = hf_model
    ck = load_checkpoint(folder)
    out = str(tmp_path / "out")
    r = subprocess.run([sys.executable, "export.py", out, "--checkpoint", folder, "--format", "hf"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, ref.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
    model = model_from_checkpoint(ck, folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids)[0], atol=1e-4, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = tokenizer_from_dict(ck["tokenizer"])
    text = "And God said, \"Let there be light\"; 2024 times."
    assert tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    again = load_checkpoint(out)  # import(export(x)) == x
    assert again["model_config"] == ck["model_config"]
    assert set(again["model"]) == set(ck["model"])
    for k in ck["model"]:
        assert torch.equal(again["model"][k], ck["model"][k]), k
    assert {k: v for k, v in again["tokenizer"].items()} == ck["tokenizer"]
    del export


def nano_checkpoint(tmp_path, tokenizer):
    """A tiny Nano-trained-style checkpoint (random weights) with a Nano tokenizer."""
    from model import ModelConfig, Transformer
    cfg = ModelConfig(block_size=64, vocab_size=max(tokenizer.vocab_size, 64), n_layer=2, n_embd=64, n_head=4,
                      n_kv_head=2, n_hidden=96)
    torch.manual_seed(3)
    return {"model_config": cfg.to_dict(), "model": Transformer(cfg).state_dict(), "tokenizer": tokenizer.to_dict()}


def test_nano_models_export_to_transformers(tmp_path, corpus):
    from tokenizer import BPETokenizer, TrieTokenizer
    trie = TrieTokenizer.build(corpus[:50], 400)
    texts = ["In the beginning God created the heavens and the earth.", "<|bos|>And the earth was formless<|eos|>"]
    for tok in (trie, BPETokenizer()):
        ck = nano_checkpoint(tmp_path, tok)
        out = str(tmp_path / tok.kind)
        files = hf.export_hf(ck, out)
        assert "tokenizer.json" in files
        back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        model = model_from_checkpoint(ck).eval()
        ids = torch.randint(0, tok.vocab_size, (1, 20), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            torch.testing.assert_close(back(ids).logits, model(ids)[0], atol=1e-4, rtol=0)
        hf_tok = transformers.AutoTokenizer.from_pretrained(out)
        for text in texts + corpus[50:60]:
            assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
            assert hf_tok.decode(tok.encode(text)) == text
        again = load_checkpoint(out)  # import(export(x)) == x, Nano's own tokenizer included
        assert again["model_config"] == ck["model_config"] and again["tokenizer"] == ck["tokenizer"]
        assert all(torch.equal(again["model"][k], v) for k, v in ck["model"].items())
    # the one documented difference of the trie tokenizer: an unknown character
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "trie"))
    assert trie.encode("a\u4e00b") == [trie.token_to_id["a"], 1, trie.token_to_id["b"]]
    assert hf_tok("a\u4e00b", add_special_tokens=False)["input_ids"] == [1]


def write(folder, name, obj):
    with open(os.path.join(folder, name), "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))


def test_refusals_are_one_clear_line(tmp_path, corpus):
    good = tmp_path / "good"
    make_hf_model(str(good), "llama", "llama3", corpus[:30], layers=1)
    config = json.loads((good / "config.json").read_text())

    def variant(name, edit=None, remove=(), damage=None):
        d = tmp_path / name
        subprocess.run(["cp", "-r", str(good), str(d)], check=True)
        if edit:
            write(str(d), "config.json", {**config, **edit})
        for f in remove:
            os.remove(d / f)
        if damage:
            data = (d / "model.safetensors").read_bytes()
            (d / "model.safetensors").write_bytes(data[:len(data) // 2])
        return str(d)

    cases = [
        (variant("gpt2", {"architectures": ["GPT2LMHeadModel"]}), "architecture 'GPT2LMHeadModel' is not supported"),
        (variant("scaled", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}}),
         "rope_parameters="),
        (variant("act", {"hidden_act": "gelu"}), "hidden_act='gelu'"),
        (variant("notok", remove=["tokenizer.json"]), "no tokenizer.json"),
        (variant("noconfig", remove=["config.json"]), "no config.json"),
        (variant("noweights", remove=["model.safetensors"]), "no model.safetensors"),
        (variant("shape", {"intermediate_size": 100}), "has shape"),
        (variant("truncated", damage=True), "truncated"),
    ]
    for folder, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
            load_checkpoint(folder)
        r = subprocess.run([sys.executable, "infer.py", "-m", folder, "--prompt", "x"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error:"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_imported_model_lora_sft_merge_and_the_c_engine(tmp_path, corpus):
    """SFT data in the model's chat template, a LoRA run on the imported directory, the merge, and the
    merged model's greedy chat answer in infer.py and in the C engine."""
    from data import prepare_sft
    from train import TrainConfig, train
    folder = str(tmp_path / "qwen")
    make_hf_model(folder, "qwen2", "chatml", corpus[:80], tied=True, layers=2)
    pairs = [{"question": f"What is {a} plus {b}?", "answer": f"{a + b}."} for a in range(12) for b in range(12)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    prepare_sft([str(tmp_path / "pairs.jsonl")], str(tmp_path / "sft"), tokenizer=folder, block_size=64, val_ratio=0.1)
    tok = tokenizer_from_dict(load_checkpoint(folder)["tokenizer"])
    out = tmp_path / "lora"
    cfg = TrainConfig(mode="lora", init_from=folder, data_dir=str(tmp_path / "sft"), out_dir=str(out), batch_size=8,
                      max_iters=30, learning_rate=1e-2, warmup_iters=2, eval_interval=15, eval_iters=2, device="cpu",
                      tensorboard=False, seq_len=64, lora={"rank": 4, "alpha": 8, "targets": ["wq", "wv", "w1"]})
    train(None, cfg, quiet=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *cmd: subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=300,
                                      env=env)
    r = run("merge_lora.py", folder, str(out / "adapter.pt"), str(tmp_path / "merged.pt"))
    assert r.returncode == 0, r.stderr
    question = "What is 3 plus 4?"
    r_py = run("infer.py", "-m", str(tmp_path / "merged.pt"), "-i", "--prompt", question, "-t", "0", "-n", "16")
    assert r_py.returncode == 0, r_py.stderr
    adapted = run("infer.py", "-m", folder, "-l", str(out / "adapter.pt"), "-i", "--prompt", question, "-t", "0",
                  "-n", "16")
    assert adapted.stdout == r_py.stdout  # merged == base + adapter
    # the merged model exported for the C engine answers the same (the prompt framed in Python: the
    # chat template's ids are given to the engine as --ids)
    import export
    export.write_model(str(tmp_path / "merged.bin"), str(tmp_path / "merged.pt"))
    built = make("-C", os.path.join(ROOT, "infer_c"), "infer")
    assert built.returncode == 0, built.stdout + built.stderr
    ids = infer.chat_ids(tok, [{"role": "user", "content": question}])
    r_c = subprocess.run([os.path.join(ROOT, "infer_c", "infer"), str(tmp_path / "merged.bin"), "--ids",
                          ",".join(map(str, ids)), "-t", "0", "-n", "16"], capture_output=True, text=True, timeout=120)
    assert r_c.returncode == 0, r_c.stderr
    assert r_c.stdout.strip() == r_py.stdout.strip()


def test_serve_chats_with_an_imported_model_in_its_template(tmp_path, corpus):
    """serve.py -m DIR: the OpenAI client's chat answer is infer.py's (the model's template, stopping
    at its end-of-turn token); --context bounds the KV cache and the prompts."""
    import openai
    from tests.test_serve import Server
    folder = str(tmp_path / "qwen")
    make_hf_model(folder, "qwen2", "chatml", corpus[:40], layers=1)
    r = subprocess.run([sys.executable, "infer.py", "-m", folder, "-i", "--prompt", "Who made the heavens?", "-t", "0",
                        "-n", "12"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    server = Server(folder, "--context", "64")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        name = client.models.list().data[0].id
        answer = client.chat.completions.create(model=name, messages=CONVERSATIONS[0], temperature=0, max_tokens=12)
        assert answer.choices[0].message.content == r.stdout.rstrip("\n")
        with pytest.raises(openai.BadRequestError, match="context"):
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": "light " * 80}])
    finally:
        server.stop()


def test_sharded_safetensors_load_as_one_file_does(tmp_path, corpus):
    """model-0000x-of-0000y.safetensors with its index: the same checkpoint as a single file."""
    whole, sharded = str(tmp_path / "whole"), str(tmp_path / "sharded")
    model = make_hf_model(whole, "qwen2", "chatml", corpus[:30], layers=2)
    model.save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        subprocess.run(["cp", os.path.join(whole, name), sharded], check=True)
    shards = [f for f in os.listdir(sharded) if f.endswith(".safetensors")]
    assert len(shards) > 1 and os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    a, b = load_checkpoint(whole), load_checkpoint(sharded)
    assert a["model_config"] == b["model_config"] and set(a["model"]) == set(b["model"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    os.remove(os.path.join(sharded, sorted(shards)[0]))  # a shard the index names is missing
    with pytest.raises(ConfigError, match="missing"):
        load_checkpoint(sharded)


def test_configs_and_weights_that_would_compute_another_model_are_refused(tmp_path, corpus):
    # the outside probe's silent wrong answers: load exactly what transformers computes, or refuse naming
    # the key. Each accepted variant's logits are transformers' own for that folder.
    from safetensors.torch import load_file, save_file
    good = tmp_path / "good"
    make_hf_model(str(good), "llama", "llama3", corpus[:30], tied=True, layers=2)
    config = json.loads((good / "config.json").read_text())
    weights = load_file(str(good / "model.safetensors"))

    def variant(name, edit=None, tensors=None):
        d = tmp_path / name
        subprocess.run(["cp", "-r", str(good), str(d)], check=True)
        write(str(d), "config.json", {**config, **(edit or {})})
        if tensors is not None:
            save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        return str(d)

    def same_logits_as_transformers(folder):
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        model = model_from_checkpoint(load_checkpoint(folder), folder).eval()
        ids = torch.randint(0, ref.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(model(ids)[0], ref(ids).logits, atol=1e-4, rtol=0)

    embedding = weights["model.embed_tokens.weight"]
    refused = [
        # a head stored beside tie_word_embeddings: true that is not the embedding
        (variant("head", tensors={**weights, "lm_head.weight": embedding + 0.1}), "lm_head.weight differs"),
        # transformers builds the model of model_type (a Mistral with a 4-token window), not `architectures`
        (variant("mistral", {"model_type": "mistral", "sliding_window": 4}), "model_type 'mistral'"),
        (variant("window", {"sliding_window": 4}), "sliding_window=4"),
        (variant("str", {"hidden_size": "64"}), 'hidden_size must be an integer, got "64"'),
        (variant("float", {"hidden_size": 64.7}), "hidden_size must be an integer, got 64.7"),
        (variant("bool", {"num_attention_heads": True}), "num_attention_heads must be an integer, got true"),
        (variant("eps", {"rms_norm_eps": "1e-5"}), "rms_norm_eps must be a number"),
        # k/v heads that do not fit the tensors: named as a shape, not blamed on a truncated file
        (variant("kv", {"num_key_value_heads": 1}), "k_proj.weight has shape"),
        # tensors of a layer the config lacks: refused here, so export.py cannot drop them silently
        (variant("extra", {"num_hidden_layers": 1}), "model.layers.1."),
    ]
    for folder, message in refused:
        with pytest.raises(ConfigError) as e:
            load_checkpoint(folder)
        assert message in str(e.value), (folder, str(e.value))
        assert "truncated" not in str(e.value)
        r = subprocess.run([sys.executable, "export.py", str(tmp_path / "x.bin"), "--checkpoint", folder], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr  # (export.py's code)
        assert not (tmp_path / "x.bin").exists()
    # accepted variants: the head stored as the embedding's copy, nulls where a default applies
    for folder in (variant("copy", tensors={**weights, "lm_head.weight": embedding.clone()}),
                   variant("nulls", {"head_dim": None, "num_key_value_heads": 2, "sliding_window": None})):
        same_logits_as_transformers(folder)
