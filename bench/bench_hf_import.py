"""
bench_hf_import.py: time and peak memory of importing a Hugging Face model directory (hf.py).

    python bench/bench_hf_import.py [--shape qwen2.5-0.5b] [--runs 3] [--out out/bench_hf_import]

It writes once a directory of random weights in the shape of Qwen2.5-0.5B (bf16 safetensors, as
the model is published; 494M parameters, tied head) with a small byte-level BPE tokenizer (the
tokenizer's size does not matter here), then, each run in a fresh process:
  * convert: `python hf.py import DIR out.pt` (read, reorder the q/k rows, write a Nano checkpoint),
  * load:    hf.load_checkpoint(DIR) + model.model_from_checkpoint, what infer.py -m DIR does.
It prints the median wall time and the median peak resident memory (the process's maximum RSS,
including the memory-mapped safetensors pages it touched), against the model's float32 size.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {"qwen2.5-0.5b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896,
                               intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                               num_key_value_heads=2, max_position_embeddings=32768, vocab_size=151936,
                               rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu", tie_word_embeddings=True,
                               use_sliding_window=False)}

LOAD = """
import sys, time
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
from hf import load_checkpoint
from model import model_from_checkpoint
model = model_from_checkpoint(load_checkpoint({folder!r}), {folder!r})
print(time.perf_counter() - t0, model.num_params())
"""


def make_model(folder, shape):
    """Random bf16 weights of the shape, written tensor by tensor's worth of memory."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    c = SHAPES[shape]
    if (folder / "model.safetensors").exists():
        return c
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    d, h, kv, f = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"]
    hd = d // h
    bf = dict(dtype=torch.bfloat16)
    t = {"model.embed_tokens.weight": torch.randn(c["vocab_size"], d, **bf) * 0.02,
         "model.norm.weight": torch.ones(d, **bf)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, shape_ in (("self_attn.q_proj", (h * hd, d)), ("self_attn.k_proj", (kv * hd, d)),
                             ("self_attn.v_proj", (kv * hd, d)), ("self_attn.o_proj", (d, h * hd)),
                             ("mlp.gate_proj", (f, d)), ("mlp.up_proj", (f, d)), ("mlp.down_proj", (d, f))):
            t[p + name + ".weight"] = torch.randn(*shape_, **bf) * 0.02
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            t[p + name + ".bias"] = torch.zeros(t[p + name + ".weight"].shape[0], **bf)
        t[p + "input_layernorm.weight"] = torch.ones(d, **bf)
        t[p + "post_attention_layernorm.weight"] = torch.ones(d, **bf)
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(c))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["In the beginning God created the heavens and the earth."] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return c


def child(cmd):
    """(wall seconds, peak RSS bytes) of a fresh process."""
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, *cmd])
    _, status, usage = os.wait4(pid, 0)
    if status:
        sys.exit(f"bench_hf_import.py: {' '.join(cmd)} failed")
    return time.perf_counter() - t0, usage.ru_maxrss * 1024


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="qwen2.5-0.5b")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "out" / "bench_hf_import"))
    args = p.parse_args(argv)
    out = Path(args.out)
    folder = out / args.shape
    c = make_model(folder, args.shape)
    d, f, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kvd = c["num_key_value_heads"] * d // c["num_attention_heads"]
    n = V * d + L * (2 * d * d + 2 * d * kvd + d + 2 * kvd + 3 * d * f + 2 * d) + d
    fp32 = 4 * n
    jobs = {"convert (hf.py import)": [str(ROOT / "hf.py"), "import", str(folder), str(out / "imported.pt")],
            "load (infer.py -m DIR)": ["-c", LOAD.format(root=str(ROOT), folder=str(folder))]}
    results = {name: [] for name in jobs}
    for _ in range(args.runs):
        for name, cmd in jobs.items():
            results[name].append(child(cmd))
    print(f"{args.shape}: {n / 1e6:.0f}M parameters, float32 {fp32 / 2 ** 30:.2f} GiB, bf16 file "
          f"{os.path.getsize(folder / 'model.safetensors') / 2 ** 30:.2f} GiB; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}; median of {args.runs}")
    print("| step | wall s | peak RSS GiB | peak / float32 size |")
    print("|---|---|---|---|")
    for name, r in results.items():
        wall, rss = statistics.median(w for w, _ in r), statistics.median(m for _, m in r)
        print(f"| {name} | {wall:.1f} | {rss / 2 ** 30:.2f} | {rss / fp32:.2f}x |")


if __name__ == "__main__":
    main()
