"""
bench_llama_cpp.py: Nano's C engine against llama.cpp itself, on the same models: export.py writes the
engine's .bin and the --format gguf file of each. Records what docs/BENCHMARKS.md reports.

    bash bench/build_llama_cpp.sh        # once: llama.cpp into out/llama.cpp/ (git-ignored)
    python bench/bench_llama_cpp.py [--models trie,bpe,hf-llama,hf-qwen2,llama2c] [--new 24] [--out out/bench_llama_cpp]

Models: a trie-tokenizer model and a GPT-2-BPE model, each trained for a minute on a few hundred
sentences (confident predictions, so that greedy text means something); two Hugging Face models
(transformers' Llama with a Llama-3-style tokenizer, Qwen2 with q/k/v biases; random weights, as
tests/test_hf.py makes them) imported by hf.py; llama2.c's stories260K (../shared/data/llama2c) when
hf.load_checkpoint reads llama2.c files (and llama.cpp's greedy text for "Once upon a time" against run.c's, the shared golden file).

For each model and each of 5 prompts (two of them non-ASCII):
  * prompt ids: the C engine's (nano_encode_prompt: <|bos|> + text, or the model's own framing) and
    llama.cpp's (llama_tokenize with its add_bos and special-token parsing; an rwkv vocabulary gets
    "<|bos|>" written before the text, since llama.cpp adds no BOS to one);
  * greedy continuation: `infer -t 0 --print-ids` against llama.cpp's argmax loop until an
    end-of-generation token, and the text each engine makes of its ids;
  * logits: llama.cpp's (f32 GGUF, every position of prompt + continuation) against the C engine's
    (--dump-logits, fp32 .bin) and PyTorch's: the largest |difference|.
llama.cpp runs through llama-cpp-python's own ctypes bindings from the same source package, loading
out/llama.cpp/bin/libllama.so (the library the CLI tools use). They need diskcache (pip install diskcache).
Also: one llama-completion run per model (the CLI's greedy text against the C engine's), and
llama-tokenize on a text with a character the trie vocabulary lacks (documented difference).
"""

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "infer_c"))

LLAMA = ROOT / "out" / "llama.cpp"
PROMPTS = ["In the beginning God created", "And God said, Let there be light", "Once upon a time a little fox",
           "The fox drank at the café by the river 😀", "你好! Then the fox went home"]


def llama_cpp_module():
    if not (LLAMA / "bin" / "libllama.so").exists():
        sys.exit(f"error: no llama.cpp build in {LLAMA}: run bash bench/build_llama_cpp.sh first")
    os.environ["LLAMA_CPP_LIB_PATH"] = str(LLAMA / "bin")
    sys.path.insert(0, str(LLAMA / "python"))
    import llama_cpp
    return llama_cpp


# ---------------------------------------------------------------------------
# Models


def corpus_sentences():
    """(documents, text to train on): the Bible's first documents; the opening of Genesis repeated, and
    bpe_models.BPE_TEXT, so that a tiny model learns them in a minute."""
    from corpus import default_corpus_documents
    from bpe_models import BPE_TEXT
    docs = [d for _, d in zip(range(60), default_corpus_documents())]
    return docs, (docs[0][:700] + " ") * 25 + BPE_TEXT


def trained_trie_checkpoint(steps=150):
    """A small model trained on Bible text and bpe_models.BPE_TEXT (its café, 😀 and 你好 are then in
    the vocabulary), in windows that start with <|bos|> and a sentence, as the engines' prompts do."""
    from bpe_models import train_on_windows
    from model import ModelConfig, Transformer
    from tokenizer import TrieTokenizer
    docs, text = corpus_sentences()
    tok = TrieTokenizer.build(docs + [text], 700)
    data = torch.tensor(tok.encode(text))
    period = tok.token_to_id["."]
    starts = torch.tensor([0] + [i + 2 for i in range(len(data) - 80) if int(data[i]) == period])
    cfg = ModelConfig(block_size=64, vocab_size=tok.vocab_size + 4, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                      n_hidden=128)
    torch.manual_seed(0)
    model = Transformer(cfg)
    train_on_windows(model, data, starts, torch.tensor([tok.bos_id]), steps)
    return {"model_config": cfg.to_dict(), "model": model.state_dict(), "tokenizer": tok.to_dict()}


def hf_checkpoint(out, arch):
    import hf
    from test_hf import make_hf_model
    docs, _ = corpus_sentences()
    folder = out / f"hf-{arch}"
    family = "llama3" if arch == "llama" else "chatml"
    make_hf_model(str(folder), arch, family, docs, tied=False)
    if family == "llama3":  # Llama 3's own tokenizer takes whole pieces first, as llama.cpp's llama-bpe does
        path = folder / "tokenizer.json"
        tj = json.loads(path.read_text(encoding="utf-8"))
        tj["model"]["ignore_merges"] = True
        path.write_text(json.dumps(tj), encoding="utf-8")
        # and Llama 3 ends at <|end_of_text|> as well as <|eot_id|> (its generation_config.json), which
        # llama.cpp does anyway by their names (without it: docs/GGUF.md, "End of generation by name")
        ids = {a["content"]: a["id"] for a in tj["added_tokens"]}
        gen = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
        gen["eos_token_id"] = [ids["<|end_of_text|>"], ids["<|eot_id|>"]]
        (folder / "generation_config.json").write_text(json.dumps(gen), encoding="utf-8")
    return hf.load_checkpoint(str(folder))


def checkpoint(name, out):
    import hf
    if name == "trie":
        return trained_trie_checkpoint()
    if name == "bpe":
        from bpe_models import trained_bpe_checkpoint
        return trained_bpe_checkpoint()
    if name in ("hf-llama", "hf-qwen2"):
        return hf_checkpoint(out, name[3:])
    if name == "llama2c":
        path = ROOT.parent / "shared" / "data" / "llama2c" / "stories260K.bin"
        if not path.exists():
            sys.exit(f"error: {path} is missing (../shared/data/llama2c)")
        return hf.load_checkpoint(str(path))
    sys.exit(f"error: unknown model {name!r}")


# ---------------------------------------------------------------------------
# The two engines


class CEngine:
    def __init__(self, path):
        from nanolib import NanoLib
        self.path, self.nl = path, NanoLib()
        lib = self.nl.lib
        lib.nano_encode_prompt.restype = ctypes.c_size_t
        lib.nano_encode_prompt.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int,
                                           ctypes.POINTER(ctypes.c_int), ctypes.c_size_t]
        self.m = self.nl.load(path)

    def prompt_ids(self, text):
        data = text.encode()
        n = self.nl.lib.nano_encode_prompt(self.m, data, len(data), 0, None, 0)
        ids = (ctypes.c_int * n)()
        self.nl.lib.nano_encode_prompt(self.m, data, len(data), 0, ids, n)
        return list(ids)

    def run(self, ids, *args):
        return subprocess.run([str(ROOT / "infer_c" / "infer"), str(self.path), "--ids", ",".join(map(str, ids)),
                               "-t", "0", "-j", "1", *args], capture_output=True, text=True, check=True)

    def greedy(self, ids, n):
        out = self.run(ids, "-n", str(n), "--print-ids").stdout.split()
        return [int(x) for x in out]

    def logits(self, ids, vocab, tmp):
        self.run(ids, "-n", "0", "--dump-logits", str(tmp))
        return np.fromfile(tmp, dtype=np.float32).reshape(len(ids), vocab)


class LlamaCpp:
    def __init__(self, llama_cpp, path, n_ctx):
        self.lc = llama_cpp
        # the KV cache in float32 (llama.cpp's default is float16, which alone moves logits by ~1e-2)
        self.llm = llama_cpp.Llama(str(path), n_ctx=max(n_ctx, 256), logits_all=True, n_threads=1, verbose=False,
                                   type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.rwkv = llama_cpp.llama_vocab_type(self.vocab) == llama_cpp.LLAMA_VOCAB_TYPE_RWKV

    def prompt_ids(self, text):
        # llama.cpp adds no BOS to an rwkv vocabulary's text: the prompt writes it out
        text = "<|bos|>" + text if self.rwkv else text
        return self.llm.tokenize(text.encode(), add_bos=True, special=True)

    def greedy_and_logits(self, ids, n):
        """Greedy ids after the prompt until an end-of-generation token (n at most), and the logits of
        every position of prompt + continuation."""
        self.llm.reset()
        self.llm.eval(ids)
        out = []
        while len(out) < n:
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            if self.lc.llama_vocab_is_eog(self.vocab, nxt):
                break
            out.append(nxt)
            self.llm.eval([nxt])
        return out, np.array(self.llm.scores[:self.llm.n_tokens], dtype=np.float32)

    def text(self, ids):
        return self.llm.detokenize(ids, special=True).decode("utf-8", errors="replace")


def completion_cli(gguf, prompt, n):
    """llama-completion's greedy text (the CLI, not the bindings): the generated part of what it prints."""
    r = subprocess.run([str(LLAMA / "bin" / "llama-completion"), "-m", str(gguf), "-p", prompt, "-n", str(n),
                        "--temp", "0", "--top-k", "1", "-no-cnv", "--no-warmup", "-t", "1",
                        "--no-display-prompt", "-c", "256", "-ctk", "f32", "-ctv", "f32"], capture_output=True, timeout=300)
    return r.stdout.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------


def compare(name, out, llama_cpp, n_new):
    import export
    from model import model_from_checkpoint
    from tokenizer import tokenizer_from_dict
    ck = checkpoint(name, out)
    cfg = ck["model_config"]
    binary, gguf = out / f"{name}.bin", out / f"{name}.f32.gguf"
    export.write_model(str(binary), ck, "fp32")
    export.write_gguf(str(gguf), ck, "fp32")
    tok = tokenizer_from_dict(ck["tokenizer"])
    c, ll = CEngine(binary), LlamaCpp(llama_cpp, gguf, cfg["block_size"])
    model = model_from_checkpoint(ck).eval()
    rows = []
    for prompt in PROMPTS:
        c_ids, l_ids = c.prompt_ids(prompt), ll.prompt_ids(prompt)
        n = min(n_new, cfg["block_size"] - len(c_ids))
        c_gen = c.greedy(c_ids, n)
        l_gen, l_logits = ll.greedy_and_logits(l_ids, n)
        seq = c_ids + c_gen
        c_logits = c.logits(seq, cfg["vocab_size"], out / "logits.f32")
        with torch.no_grad():
            t_logits = model(torch.tensor([seq]))[0][0].numpy()
        same = min(len(seq), len(l_logits))
        rows.append({
            "prompt": prompt, "prompt_ids_equal": c_ids == l_ids, "greedy_ids_equal": c_gen == l_gen,
            "n_prompt": len(c_ids), "n_generated": [len(c_gen), len(l_gen)],
            "c_text": tok.decode(c_gen), "llama_cpp_text": ll.text(l_gen),
            "max_abs_logit_diff_c": float(np.abs(l_logits[:same] - c_logits[:same]).max()),
            "max_abs_logit_diff_torch": float(np.abs(l_logits[:same] - t_logits[:same]).max()),
            "argmax_agree": int((l_logits[:same].argmax(-1) == c_logits[:same].argmax(-1)).sum()), "positions": same})
        if c_ids != l_ids:
            rows[-1].update(c_ids=c_ids, llama_cpp_ids=l_ids)
        if c_gen != l_gen:
            rows[-1].update(c_gen=c_gen, llama_cpp_gen=l_gen)
    cli_prompt = ("<|bos|>" if ll.rwkv else "") + PROMPTS[0]
    cli = {"prompt": PROMPTS[0], "llama_completion": completion_cli(gguf, cli_prompt, n_new),
           "c_text": tok.decode(c.greedy(c.prompt_ids(PROMPTS[0]), n_new))}
    # llama-completion ends its output with a blank line of its own; and it prints through an asynchronous
    # logger that now and then loses the last tokens at exit, so its text is checked as a prefix too
    printed = cli["llama_completion"].rstrip("\n")
    cli.update(equal=printed == cli["c_text"].rstrip("\n"), prefix=cli["c_text"].startswith(printed))
    result = {"model": name, "config": {k: cfg[k] for k in ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head",
                                                              "qkv_bias", "bias", "tie_embeddings")},
              "tokenizer": ck["tokenizer"]["type"], "prompts": rows, "cli": cli}
    if name == "trie":
        result["unknown_characters"] = unknown_character_demo(gguf, tok)
    if name == "llama2c":  # run.c's own greedy text: -n 200 steps, the last prompt token's the first that samples
        golden = (ROOT.parent / "shared" / "data" / "llama2c" / "greedy_once_upon_a_time.txt").read_text(encoding="utf-8")
        ids = ll.prompt_ids("Once upon a time")
        gen, _ = ll.greedy_and_logits(ids, 200 - len(ids) + 1)
        result["run_c_golden_equal"] = "Once upon a time" + ll.text(gen) == golden.rstrip("\n")
    return result


def unknown_character_demo(gguf, tok):
    """The trie vocabulary lacks '<' (Bible text has none) and 'è' (it has 'é'): llama.cpp's rwkv tokenizer loops."""
    res = {}
    for text in ("a < b", "fox <|eos|> b", "caf\u00e8"):
        try:
            r = subprocess.run([str(LLAMA / "bin" / "llama-tokenize"), "-m", str(gguf), "-p", text, "--ids",
                                "--log-disable"], capture_output=True, text=True, timeout=30)
            theirs = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else f"rc {r.returncode}"
        except subprocess.TimeoutExpired:
            theirs = "no answer within 30 s"
        res[text] = {"nano": tok.encode(text), "llama-tokenize": theirs}
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--models", default="trie,bpe,hf-llama,hf-qwen2,llama2c")
    ap.add_argument("--new", type=int, default=24, help="greedy tokens per prompt")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_llama_cpp"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    llama_cpp = llama_cpp_module()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "load_before": os.getloadavg()[0], "llama_cpp": (LLAMA / "VERSION").read_text().strip(), "models": []}
    for name in args.models.split(","):
        print(f"== {name}", file=sys.stderr)
        result = compare(name, out, llama_cpp, args.new)
        report["models"].append(result)
        for r in result["prompts"]:
            print(f"  {r['prompt'][:32]!r:36} ids {'=' if r['prompt_ids_equal'] else 'DIFFER'}  greedy "
                  f"{'=' if r['greedy_ids_equal'] else 'DIFFER'} ({r['n_generated']})  max|dlogit| vs C "
                  f"{r['max_abs_logit_diff_c']:.2e} vs torch {r['max_abs_logit_diff_torch']:.2e}  argmax "
                  f"{r['argmax_agree']}/{r['positions']}", file=sys.stderr)
    report["load_after"] = os.getloadavg()[0]
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    print(json.dumps(report, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
