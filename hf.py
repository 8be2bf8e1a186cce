"""
Hugging Face model directories in and out: Llama-family checkpoints load wherever a Nano
checkpoint does, and Nano checkpoints export to them.

    python infer.py -m ~/models/SmolLM2-135M-Instruct -i         # a model directory is a checkpoint
    python hf.py import ~/models/Qwen2.5-0.5B qwen.pt              # or convert it once, to a .pt
    python export.py out/hf --checkpoint ckpt.pt --format hf       # and back (export.py calls export_hf)

Every script that takes a checkpoint reads it with load_checkpoint here: a Nano checkpoint file or a
model directory. (The directory's tokenizer alone is tokenizer.load_tokenizer_dir's.)

A directory holds config.json, model.safetensors (or model-0000x-of-0000y.safetensors with
model.safetensors.index.json), tokenizer.json and, optionally, tokenizer_config.json and
generation_config.json. Nothing is downloaded: fetch a model yourself, for example with
`huggingface-cli download HuggingFaceTB/SmolLM2-135M-Instruct --local-dir ~/models/SmolLM2-135M-Instruct`.

Architectures: LlamaForCausalLM (tied or untied head; biases on all projections or none) and
Qwen2ForCausalLM (biases on q, k and v only). They are model.py's model with other names, except
for one convention: Hugging Face's rotary embedding turns the two halves of each head against each
other (dimension i with i + head_dim/2), and Nano's turns adjacent pairs (2i with 2i+1). Attention
scores do not depend on the order of a head's dimensions, as long as q and k use the same one, so
import reorders the rows of wq and wk (and their biases) once, from halves to pairs, and export
puts them back. The frequencies already agree: pair i turns by theta^(-2i/head_dim) in both.
"""

import argparse
import json
import os
import re

import torch

from files import ConfigError, import_checkpoint, load_nano_checkpoint, read_folder_json
from llama2c import hf_tokenizer_files, is_llama2c, load_llama2c
from model import ModelConfig, Transformer
from tokenizer import SPECIAL_TOKENS, TokenizerError, _gpt2_files, load_tokenizer, load_tokenizer_dir, tokenizer_from_dict

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}  # -> the model_type transformers builds
NANO_TOKENIZER = "nano_tokenizer.json"  # a Nano-trained model's own tokenizer, beside its tokenizer.json
# config.json keys with a value Nano's model cannot follow: key -> the values it can (None = absent)
MUST_BE = {"hidden_act": ("silu",), "rope_scaling": (None,), "use_sliding_window": (None, False),
           "pretraining_tp": (None, 1), "tie_word_embeddings": (None, True, False)}

# names: Hugging Face's (per layer after "model.layers.{i}.") -> Nano's (after "layers.{i}.")
LAYER_NAMES = {"self_attn.q_proj": "attn.wq", "self_attn.k_proj": "attn.wk", "self_attn.v_proj": "attn.wv",
               "self_attn.o_proj": "attn.wo", "mlp.gate_proj": "ffn.w1", "mlp.down_proj": "ffn.w2",
               "mlp.up_proj": "ffn.w3", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
TOP_NAMES = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}


# ---------------------------------------------------------------------------
# config.json <-> ModelConfig


def model_config_from_hf(hf, where):
    """Nano's model config for a Hugging Face config.json, or ConfigError naming what does not fit."""
    arch = (hf.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{where}: architecture {arch!r} is not supported (Nano imports {', '.join(ARCHITECTURES)})")
    if hf.get("model_type", ARCHITECTURES[arch]) != ARCHITECTURES[arch]:
        # transformers builds the model of model_type (mistral: sliding-window attention), whatever
        # `architectures` says: Nano would compute another model
        raise ConfigError(f"{where}: model_type {hf['model_type']!r} with architecture {arch} (Nano imports "
                          f"{arch} as model_type {ARCHITECTURES[arch]!r})")
    unfit = [f"{k}={hf[k]!r}" for k, allowed in MUST_BE.items() if hf.get(k) not in allowed]
    if arch == "LlamaForCausalLM" and bool(hf.get("attention_bias")) != bool(hf.get("mlp_bias")):
        unfit.append(f"attention_bias={hf.get('attention_bias')!r} with mlp_bias={hf.get('mlp_bias')!r} "
                     "(Nano has biases on every projection or on none)")
    if arch == "Qwen2ForCausalLM" and hf.get("use_sliding_window") and hf.get("sliding_window"):
        unfit.append(f"sliding_window={hf['sliding_window']!r}")
    if arch == "LlamaForCausalLM" and hf.get("sliding_window") is not None:  # (Llama has none: refused, not ignored)
        unfit.append(f"sliding_window={hf['sliding_window']!r}")
    rope = hf.get("rope_parameters") or {}  # transformers 5 writes rope_theta and rope_scaling here
    if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
        unfit.append(f"rope_parameters={rope!r} (Nano's rotary embedding is the default kind, unscaled)")
    if any(t != "full_attention" for t in hf.get("layer_types") or []):
        unfit.append("layer_types other than full_attention (sliding windows)")
    if unfit:
        raise ConfigError(f"{where}: {arch} with settings Nano's model does not have: {'; '.join(unfit)}")

    def size(key, default=None):  # a JSON integer, as transformers reads it: not "64", not 64.7, not true
        value = hf.get(key)
        value = default if value is None else value  # (null is absent: some configs write head_dim: null)
        if value is None:
            raise ConfigError(f"{where}: {arch} config has no {key}")
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be an integer, got {json.dumps(value)}")
        return value

    def number(value, key):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be a number, got {json.dumps(value)}")
        return float(value)

    n_embd, n_head = size("hidden_size"), size("num_attention_heads")
    if n_head <= 0:
        raise ConfigError(f"{where}: num_attention_heads must be positive, got {n_head}")
    cfg = ModelConfig(
        block_size=size("max_position_embeddings"), vocab_size=size("vocab_size"), n_layer=size("num_hidden_layers"),
        n_embd=n_embd, n_head=n_head, n_kv_head=size("num_key_value_heads", n_head),
        n_hidden=size("intermediate_size"), head_dim=size("head_dim", n_embd // n_head),
        bias=arch == "LlamaForCausalLM" and bool(hf.get("attention_bias")),
        qkv_bias=arch == "Qwen2ForCausalLM", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=number(rope.get("rope_theta", hf.get("rope_theta", 10000.0)), "rope_theta"),
        norm_eps=number(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps"))
    cfg.validate(where)
    return cfg


def hf_config(cfg, tok):
    """config.json for a Nano model config (export)."""
    if not cfg.use_rope or not cfg.is_causal:
        raise ConfigError("Hugging Face Llama models are causal with rotary positions: this model "
                          f"({'learned positions' if not cfg.use_rope else 'bidirectional'}) has no such form")
    if cfg.n_embd != cfg.n_head * cfg.head_dim:
        raise ConfigError("n_embd must equal n_head x head_dim")
    if cfg.recipe():  # transformers would load the weights and compute another model
        raise ConfigError(f"this model uses {', '.join(f'{k}={v}' for k, v in cfg.recipe().items())}, which Hugging Face "
                          "Llama and Qwen2 models do not have (docs/RECIPES.md)")
    qwen = cfg.qkv_bias and not cfg.bias
    d = {"architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
         "model_type": "qwen2" if qwen else "llama", "hidden_size": cfg.n_embd,
         "intermediate_size": cfg.n_hidden, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
         "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "max_position_embeddings": cfg.block_size,
         "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
         "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32",
         "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    if not qwen:
        d.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    return d


# ---------------------------------------------------------------------------
# Weights: names and the rotary row order


def halves_to_pairs(w, n_heads, head_dim):
    """Rows of wq/wk (or their bias) from Hugging Face's order (per head: the first halves of the
    pairs, then the second halves) to Nano's (the pairs side by side)."""
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(n_heads * head_dim, *rest)


def pairs_to_halves(w, n_heads, head_dim):
    rest = w.shape[1:]
    return w.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(n_heads * head_dim, *rest)


def nano_name(hf_name):
    """'model.layers.3.self_attn.q_proj.weight' -> 'layers.3.attn.wq.weight' (None: not a weight of ours)."""
    stem, _, kind = hf_name.rpartition(".")
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
    if m and m.group(2) in LAYER_NAMES:
        return f"layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.{kind}"
    return f"{TOP_NAMES[stem]}.{kind}" if stem in TOP_NAMES else None


def hf_name(name):
    stem, _, kind = name.rpartition(".")
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", stem)
    if m:
        back = {v: k for k, v in LAYER_NAMES.items()}
        return f"model.layers.{m.group(1)}.{back[m.group(2)]}.{kind}"
    return f"{ {v: k for k, v in TOP_NAMES.items()}[stem]}.{kind}"


def weight_files(folder):
    """The safetensors files of a model directory: one, or the shards its index names."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_folder_json(folder, "model.safetensors.index.json").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConfigError(f"{index}: no weight_map")
        return [os.path.join(folder, f) for f in sorted(set(weight_map.values()))]
    single = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(single):
        raise ConfigError(f"{folder}: no model.safetensors (nor model.safetensors.index.json); "
                          ".bin (pickle) weights are not read: they can run code")
    return [single]


def load_weights(folder):
    """Nano-named tensors (float32, as stored: Hugging Face's row order) from the safetensors files, one
    tensor at a time (the files are memory-mapped, so the peak is the float32 model plus one tensor)."""
    from safetensors import safe_open
    from safetensors import SafetensorError
    sd, skipped = {}, []
    for path in weight_files(folder):
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: missing (named by the index)")
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    name = nano_name(key)
                    if name is None:
                        if not key.endswith("rotary_emb.inv_freq"):
                            skipped.append(key)
                        continue
                    sd[name] = f.get_tensor(key).float()
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ConfigError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]}); "
                              "is it truncated or still downloading?") from None
    if skipped:
        raise ConfigError(f"{folder}: tensors Nano's model has no place for: {', '.join(skipped[:5])}"
                          f"{' ...' if len(skipped) > 5 else ''}")
    return sd


def check_weights(sd, cfg, where):
    """Exactly the tensors the model has, each of its shape; a head stored beside tied embeddings only
    if it is the embedding (transformers would use a different one, Nano the embedding): one clear
    line otherwise. Drops that copy of the head."""
    if cfg.tie_embeddings and "output.weight" in sd:
        head, embedding = sd.pop("output.weight"), sd.get("tok_embeddings.weight")
        if embedding is None or head.shape != embedding.shape or not torch.equal(head, embedding):
            raise ConfigError(f"{where}: lm_head.weight differs from model.embed_tokens.weight although config.json "
                              "says tie_word_embeddings: true (which one the model means is not clear; Nano ties)")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    missing, extra = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing:
        raise ConfigError(f"{where}: the weights lack {', '.join(hf_name(k) for k in missing[:5])}"
                          f"{' ...' if len(missing) > 5 else ''} (config.json and the weights do not agree)")
    if extra:
        raise ConfigError(f"{where}: the weights hold {', '.join(hf_name(k) for k in extra[:5])}"
                          f"{' ...' if len(extra) > 5 else ''}, which config.json's model has no place for")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise ConfigError(f"{where}: {hf_name(k)} has shape {tuple(sd[k].shape)}, config.json implies {shape}")


def to_nano_rows(sd, cfg):
    """wq and wk (and their biases) from Hugging Face's rotary row order to Nano's, in place, one at a time."""
    for name in list(sd):
        if name.endswith(("attn.wq.weight", "attn.wq.bias", "attn.wk.weight", "attn.wk.bias")):
            heads = cfg.n_head if ".wq." in name else cfg.n_kv_head
            sd[name] = halves_to_pairs(sd[name], heads, cfg.head_dim).contiguous()
    return sd


# ---------------------------------------------------------------------------
# Import and export


def nano_tokenizer(folder):
    """The Nano tokenizer export_hf saved beside a model trained with Nano (nano_tokenizer.json), so that
    importing the export gives the checkpoint back exactly; None for other models."""
    path = os.path.join(folder, NANO_TOKENIZER)
    if not os.path.isfile(path):
        return None
    try:
        return load_tokenizer(path)
    except TokenizerError as e:
        raise ConfigError(str(e)) from None


def load_hf(folder):
    """A Nano checkpoint dict from a Hugging Face model directory (what load_checkpoint returns for one)."""
    folder = os.fspath(folder)
    cfg = model_config_from_hf(read_folder_json(folder, "config.json"), os.path.join(folder, "config.json"))
    tok = nano_tokenizer(folder) or load_tokenizer_dir(folder)
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"{folder}: the tokenizer has {tok.vocab_size} tokens, the model {cfg.vocab_size} embedding rows")
    sd = load_weights(folder)
    check_weights(sd, cfg, folder)
    to_nano_rows(sd, cfg)
    return {"format": "nano-checkpoint", "version": 1, "model_config": cfg.to_dict(), "model": sd,
            "tokenizer": tok.to_dict(), "imported_from": os.path.abspath(folder)}


def load_checkpoint(path):
    """A checkpoint dict (on the CPU) from a Nano checkpoint file (files.load_nano_checkpoint), a
    Hugging Face model directory (load_hf) or a llama2.c model file (llama2c.load_llama2c): what every
    script that takes a checkpoint calls. Errors are ConfigErrors that name the file and what is wrong."""
    if os.path.isdir(path):  # a Hugging Face model directory is a checkpoint too
        return load_hf(path)
    if is_llama2c(path):  # and so is a llama2.c model (with its tokenizer.bin beside it)
        return load_llama2c(path)
    return load_nano_checkpoint(path)


def export_hf(ck, out_dir):
    """Write a Nano checkpoint dict as a Hugging Face model directory."""
    from safetensors.torch import save_file
    cfg = ModelConfig.from_dict(ck["model_config"], "checkpoint model_config")
    tok = tokenizer_from_dict(ck["tokenizer"])
    config = hf_config(cfg, tok)
    tensors = {}
    for name, t in ck["model"].items():
        if ".lora_" in name:
            raise ConfigError("the checkpoint holds LoRA tensors: merge the adapter first (merge_lora.py)")
        t = t.detach().float().cpu()
        if name.endswith(("attn.wq.weight", "attn.wq.bias")):
            t = pairs_to_halves(t, cfg.n_head, cfg.head_dim)
        elif name.endswith(("attn.wk.weight", "attn.wk.bias")):
            t = pairs_to_halves(t, cfg.n_kv_head, cfg.head_dim)
        tensors[hf_name(name)] = t.contiguous()
    os.makedirs(out_dir, exist_ok=True)
    # Nano puts <|bos|> before every prompt, except for models imported from the 2024.10 layout (infer.py)
    files = tokenizer_files(tok, bos_first=ck.get("prompt_format") != "2024.10")
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
           "pad_token_id": config["pad_token_id"]}
    if tok.kind != "hf":  # the exact tokenizer for import; tokenizer.json is what other tools read
        files[NANO_TOKENIZER] = tok.to_dict()
    if tok.kind == "hf" and tok.stop_ids:
        gen["eos_token_id"] = tok.stop_ids if len(tok.stop_ids) > 1 else tok.stop_ids[0]
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    for name, d in (("config.json", config), ("generation_config.json", gen), *files.items()):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(d if isinstance(d, str) else json.dumps(d, indent=1, ensure_ascii=False))
    return sorted(["model.safetensors", "config.json", "generation_config.json", *files])


def tokenizer_files(tok, bos_first=True):
    """{file name: text or dict}: tokenizer.json and tokenizer_config.json for a Nano tokenizer.
    bos_first: Nano puts <|bos|> before a prompt, so tokenizer.json's post-processor does (what the
    tokenizers library and transformers follow) and tokenizer_config.json says add_bos_token (what
    llama.cpp's convert_hf_to_gguf.py reads).
    The trie tokenizer becomes a WordPiece model without a pre-tokenizer and with an empty
    continuation prefix: greedy longest match from the left, which is Nano's rule, so the ids are the
    same for every text whose characters are all in the vocabulary. One difference remains:
    WordPiece turns a whole word (here: the whole text between special tokens) into one
    <|unknown|> when a character of it is unknown, where Nano makes only that character <|unknown|>."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    if tok.kind == "llama2c":  # Llama 2's own form (llama2c.py)
        return hf_tokenizer_files(tok)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    if tok.kind == "hf":
        spec = tok.to_dict()
        config.update({role + "_token": tok.tok.id_to_token(i) for role, i in
                       (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)) if i is not None})
        if spec.get("template"):
            config["chat_template"] = spec["template"]
        return {"tokenizer.json": spec["json"], "tokenizer_config.json": config}
    if tok.kind == "bpe":
        paths = _gpt2_files()
        with open(paths["encoder.json"], encoding="utf-8") as f:
            vocab = json.load(f)
        with open(paths["vocab.bpe"], encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().splitlines()[1:] if line.strip()]
        hf = Tokenizer(models.BPE(vocab, merges))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        specials = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    else:
        vocab = {t: i for i, t in enumerate(tok.tokens)}
        hf = Tokenizer(models.WordPiece(vocab, unk_token=SPECIAL_TOKENS[1], continuing_subword_prefix="",
                                        max_input_chars_per_word=2 ** 31 - 1))
        hf.decoder = decoders.Fuse()
        specials = [(t, i) for i, t in enumerate(SPECIAL_TOKENS)]
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s, _ in specials])
    config.update(bos_token=SPECIAL_TOKENS[2], eos_token=SPECIAL_TOKENS[3], pad_token=SPECIAL_TOKENS[0],
                  unk_token=SPECIAL_TOKENS[1], add_bos_token=bos_first, add_eos_token=False)
    if bos_first:
        bos = SPECIAL_TOKENS[2]
        hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                          special_tokens=[(bos, tok.bos_id)])
    return {"tokenizer.json": hf.to_str(), "tokenizer_config.json": config}


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert a Hugging Face model directory into a Nano checkpoint (.pt)")
    p.add_argument("command", choices=["import"])
    p.add_argument("folder", help="the model directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("out", help="the checkpoint to write")
    args = p.parse_args(argv)
    import_checkpoint(lambda: load_hf(args.folder), args.out,
                      lambda ck: f"chat template {ck['tokenizer'].get('chat') or 'none'}")


if __name__ == "__main__":
    main()
