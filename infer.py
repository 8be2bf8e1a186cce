"""
Talk to a Nano model in PyTorch.

    python infer.py -m checkpoint/pretrain/best.pt                     # REPL, continuation mode
    python infer.py -m checkpoint/sft/best.pt -i                       # REPL, instruct (chat) mode
    python infer.py -m ckpt.pt --prompt "In the beginning" -t 0        # one shot, greedy
    python infer.py -m base.pt -l checkpoint/lora/adapter.pt -i        # base + LoRA adapter

Prompts are framed the way the training data was: continuation mode feeds
<|bos|> + text; instruct mode feeds <|bos|><|instruct_mark|> + text + <|response_mark|>
and the answer ends at <|eos|>. A model imported from the original 2024.10 layout
(import_bin.py) is framed as the original engine did, without the <|bos|>. The C and
browser engines frame prompts the same way, and share these sampling defaults and ranges.
Decoding uses the KV cache; tokens are printed as they are made; continuation mode with
--prompt prints the prompt first.
REPL commands: /help, /quit, /lora (toggle the adapter), /mode (instruct <-> continue);
a line starting with // sends the rest from its second slash on ("//etc" -> "/etc").
"""

import argparse
import math
import os
import struct
import sys
import time

import torch

from data import chat_encode
from files import NANO_BIN_MAGIC, ConfigError, NanoError, load_adapter
from hf import load_checkpoint
from model import attach_lora, model_from_checkpoint, set_lora_enabled
from tokenizer import tokenizer_from_dict


FRAMING_2024 = "2024.10"  # checkpoint["prompt_format"] of models imported by import_bin.py
REPL_COMMANDS = "/mode (instruct <-> continue)  /lora (adapter on/off)  /quit  //text (sends \"/text\")"


def prompt_ids(tok, text, instruct, prompt_format=None):
    """The ids a prompt is fed as (docs/FORMAT.md, "Prompt framing"): Nano's data puts <|bos|> before
    every sample; the original 2024.10 engine, and the models trained for it, have none."""
    if tok.kind == "hf":  # an imported model: its own template, or its own pipeline's framing
        return chat_ids(tok, [{"role": "user", "content": text}]) if instruct else tok.encode_document(text)
    if instruct:
        check_instruct_marks(tok)
    ids = [tok.instruct_id] + tok.encode(text) + [tok.response_id] if instruct else tok.encode(text)
    return ids if prompt_format == FRAMING_2024 else [tok.bos_id] + ids


def chat_ids(tok, messages, prompt_format=None):
    """The ids a whole conversation is fed as, ending where the model's next reply begins.
    messages: [{"role": "system" | "user" | "assistant", "content": str}, ...], the last one from the
    user. Nano's framing is the SFT data's, one function for both (data.chat_encode): each exchange is
    <|instruct_mark|> question <|response_mark|> answer <|eos|>, after one <|bos|>; a system message
    goes before the next user message, separated by a blank line.
    A model imported from Hugging Face is framed by its own chat template (HFTokenizer.chat_text)."""
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("the last message must be the user's")
    if tok.kind == "hf":
        return tok.encode(tok.chat_text(messages))
    check_instruct_marks(tok)
    return chat_encode(tok, messages, bos=prompt_format != FRAMING_2024)[0]


def check_instruct_marks(tok):
    """A tokenizer without Nano's instruct marks (a llama2.c model's) frames no chat: say so (ValueError)."""
    if tok.instruct_id is None or tok.response_id is None:
        raise ValueError("this model's tokenizer has no <|instruct_mark|> or <|response_mark|> token, so instruct "
                         "(chat) mode cannot frame the prompt: use continuation mode")


def stop_ids(tok):
    """The tokens that end an answer: <|eos|>, or an imported model's end-of-turn tokens as well."""
    return getattr(tok, "stop_ids", None) or [tok.eos_id]


def check_sampling(args):
    """The sampling ranges of every engine; infer_c/main.c and the browser page give the same messages.
    Returns the first problem, or None."""
    for flag, name, value in (("-t", "temperature", args.temperature), ("-p", "top_p", args.top_p),
                              ("-r", "repetition penalty", args.repetition_penalty)):
        if not math.isfinite(value):
            return f"{flag}: {name} must be a finite number, got {value:g}"
    if args.temperature < 0:
        return f"-t: temperature must be >= 0 (0 = greedy), got {args.temperature:g}"
    if args.top_k < 0:
        return f"-k: top_k must be >= 0 (0 = off), got {args.top_k}"
    if not 0 < args.top_p <= 1:
        return f"-p: top_p must be in (0, 1] (1 = off), got {args.top_p:g}"
    if args.repetition_penalty <= 0:
        return f"-r: repetition penalty must be > 0 (1 = off), got {args.repetition_penalty:g}"
    if args.max_new_tokens < 0:
        return f"-n: max new tokens must be >= 0, got {args.max_new_tokens}"
    if not 0 <= args.seed <= 2 ** 31 - 1:
        return f"-s: seed must be in [0, 2147483647], got {args.seed}"
    return None


class StreamPrinter:
    """Prints text as tokens arrive. Re-decodes the whole answer so multi-token characters
    (byte-level BPE) print once complete; a trailing U+FFFD means 'incomplete, wait'. finish()
    prints what is still held back: a reply that ends inside a character ends in U+FFFD, as the C
    engine's and the browser page's do (so all three print tok.decode of the reply)."""

    def __init__(self, tok, out=None):
        self.tok, self.out, self.ids, self.shown = tok, out or sys.stdout, [], 0

    def __call__(self, token_id):
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return False
        self._show(text)
        return False

    def finish(self):
        self._show(self.tok.decode(self.ids))

    def _show(self, text):
        self.out.write(text[self.shown:])
        self.out.flush()
        self.shown = len(text)


def generate_text(model, tok, text, args, instruct, stream=True):
    ids = prompt_ids(tok, text, instruct, getattr(model, "prompt_format", None))
    if not ids:
        raise ValueError("the prompt is empty, and a 2024.10 model is continued without a <|bos|> in front: "
                         "give it some text")
    if len(ids) >= model.cfg.block_size:
        print(f"[prompt is {len(ids)} tokens; only the last {model.cfg.block_size - 1} fit the context]",
              file=sys.stderr)
    gen = torch.Generator().manual_seed(args.seed)  # a CPU one: model.sample_next samples on the CPU
    printer = StreamPrinter(tok) if stream else None
    first_token_at = []
    t0 = time.perf_counter()

    def on_token(token_id):
        if not first_token_at:
            first_token_at.append(time.perf_counter())
        return printer(token_id) if printer else False

    out = model.generate(ids[-(model.cfg.block_size - 1):], max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         repetition_penalty=args.repetition_penalty, eos_id=stop_ids(tok),
                         callback=on_token, generator=gen)
    t1 = time.perf_counter()
    if stream:
        printer.finish()
        print()
    if not out and args.max_new_tokens > 0:  # else the answer is a bare blank line, which looks like a fault
        print("[no text: the model's first token was <|eos|> (end of text)]", file=sys.stderr)
    if args.profile and out:
        ttft = first_token_at[0] - t0
        rate = (len(out) - 1) / (t1 - first_token_at[0]) if len(out) > 1 else float("nan")
        print(f"[profile] prompt {len(ids)} tokens | time to first token {1000 * ttft:.1f} ms | "
              f"{len(out)} tokens | decode {rate:.1f} tokens/s", file=sys.stderr)
    return tok.decode(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Nano inference (PyTorch)")
    p.add_argument("-m", "--model", required=True, help="checkpoint (.pt) written by train.py, a run folder (its best.pt), or a Hugging Face model directory")
    p.add_argument("-l", "--lora", help="LoRA adapter checkpoint to attach")
    p.add_argument("-i", "--instruct", action="store_true", help="instruct (chat) mode")
    p.add_argument("--prompt", help="generate once for this prompt and exit")
    p.add_argument("-s", "--seed", type=int, default=0, help="0 .. 2147483647; the REPL reseeds every message")
    p.add_argument("-t", "--temperature", type=float, default=0.8, help=">= 0, 0 = greedy")
    p.add_argument("-k", "--top-k", type=int, default=0, help=">= 0, 0 = off")
    p.add_argument("-p", "--top-p", type=float, default=0.95, help="in (0, 1], 1 = off")
    p.add_argument("-r", "--repetition-penalty", type=float, default=1.0, help="> 0, 1 = off")
    p.add_argument("-n", "--max-new-tokens", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--profile", action="store_true", help="print time to first token and tokens/s")
    args = p.parse_args(argv)
    problem = check_sampling(args)
    if problem:
        p.error(problem)
    return args


def refuse_nano_bin(path):
    """A .bin for the C and browser engines given where a .pt belongs: say so, instead of torch's
    long weights-only error."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return  # load_checkpoint names the problem
    if len(head) < 20 or head[:8] != NANO_BIN_MAGIC:
        return
    major, minor, kind = struct.unpack_from("<iii", head, 8)
    what = "LoRA adapter" if kind == 10 else "model"
    hint = f"run it with ./infer_c/infer{' MODEL.bin -l' if kind == 10 else ''} {path} or in the browser page"
    if (major, minor) == (2024, 10) and kind != 10:
        hint += f", or import it for infer.py: python import_bin.py {path} model.pt"
    raise ConfigError(f"{path} is a Nano .bin {what} (layout {major}.{minor}) for the C and browser engines; "
                      f"infer.py reads .pt checkpoints: {hint}")


def refuse_non_finite(model, path):
    """export.py refuses such weights; generating from them would print noise without a word."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ConfigError(f"{path}: {bad[0]} holds NaN or inf values ({len(bad)} tensor(s) do): the checkpoint is "
                          "broken (did training diverge?)")


def run_checkpoint(path):
    """A training run's folder (checkpoint/pretrain) stands for its best checkpoint: best.pt, else
    last.pt (said on stderr). A Hugging Face model directory (config.json) and files are themselves."""
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "config.json")):
        return path
    for name in ("best.pt", "last.pt"):
        if os.path.isfile(os.path.join(path, name)):
            print(f"[{path} is a training run: using its {name}]", file=sys.stderr)
            return os.path.join(path, name)
    return path


def load(args):
    args.model = run_checkpoint(args.model)
    refuse_nano_bin(args.model)
    ck = load_checkpoint(args.model)
    model = model_from_checkpoint(ck, args.model, args.device).eval()
    refuse_non_finite(model, args.model)
    model.prompt_format = ck.get("prompt_format")  # FRAMING_2024 for imported 2024.10 models
    if "tokenizer" not in ck:
        raise ConfigError(f"{args.model} holds no tokenizer")
    tok = tokenizer_from_dict(ck["tokenizer"])
    adapter = None
    if args.lora:
        refuse_nano_bin(args.lora)
        adapter = load_adapter(args.lora, ck)
        attach_lora(model, adapter)
    return model, tok, adapter


def repl(model, tok, adapter, args):
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    instruct = args.instruct
    print(f"Nano ({model.num_params() / 1e6:.1f}M params, {'instruct' if instruct else 'continue'} mode"
          f"{', adapter on' if adapter else ''}). /help for commands, Ctrl-D to quit.")
    while True:
        try:
            text = input("> " if instruct else "prompt> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        cmd = text.strip()
        if cmd in ("/quit", "/exit"):
            return
        if cmd == "/help":
            print(REPL_COMMANDS)
            continue
        if cmd == "/mode":
            instruct = not instruct
            print(f"[{'instruct' if instruct else 'continue'} mode]")
            continue
        if cmd == "/lora":
            if adapter is None:
                print("[no adapter loaded: start with -l adapter.pt]")
            else:
                adapter["enabled"] = not adapter.get("enabled", True)
                set_lora_enabled(model, adapter["enabled"])
                print(f"[adapter {'on' if adapter['enabled'] else 'off'}]")
            continue
        if cmd.startswith("/") and not cmd.startswith("//"):
            print(f"unknown command {cmd} (not sent to the model); the commands are: {REPL_COMMANDS}")
            continue
        if cmd.startswith("//"):
            text = cmd[1:]
        if not cmd:
            continue
        try:
            generate_text(model, tok, text, args, instruct)
        except KeyboardInterrupt:
            print("\n[stopped]")


def main(argv=None):
    args = parse_args(argv)
    try:
        torch.manual_seed(args.seed)
        model, tok, adapter = load(args)
    except (NanoError, ValueError) as e:  # ValueError: a check of model.py's on the checkpoint
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.prompt is not None:
        if not args.instruct:
            sys.stdout.write(args.prompt)  # continuation mode prints the whole text, as infer_c's -g does
        try:
            generate_text(model, tok, args.prompt, args, args.instruct)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    else:
        repl(model, tok, adapter, args)


if __name__ == "__main__":
    main()
