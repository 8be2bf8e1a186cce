"""
Talk to a Nano model in PyTorch.

    python infer.py -m checkpoint/pretrain/best.pt                     # REPL, continuation mode
    python infer.py -m checkpoint/sft/best.pt -i                       # REPL, instruct (chat) mode
    python infer.py -m ckpt.pt --prompt "In the beginning" -t 0        # one shot, greedy
    python infer.py -m base.pt -l checkpoint/lora/adapter.pt -i        # base + LoRA adapter

Prompts are framed the way the training data was: continuation mode feeds
<|bos|> + text; instruct mode feeds <|bos|><|instruct_mark|> + text + <|response_mark|>
and the answer ends at <|eos|>. The C and browser engines frame prompts the same way.
Decoding uses the KV cache; tokens are printed as they are made.
REPL commands: /help, /quit, /lora (toggle the adapter), /mode (instruct <-> continue).
"""

import argparse
import sys
import time

import torch

from files import ConfigError, load_adapter, load_checkpoint
from model import attach_lora, model_from_checkpoint
from tokenizer import tokenizer_from_dict


def prompt_ids(tok, text, instruct):
    if instruct:
        return [tok.bos_id, tok.instruct_id] + tok.encode(text) + [tok.response_id]
    return [tok.bos_id] + tok.encode(text)


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
    ids = prompt_ids(tok, text, instruct)
    if len(ids) >= model.cfg.block_size:
        print(f"[prompt is {len(ids)} tokens; only the last {model.cfg.block_size - 1} fit the context]",
              file=sys.stderr)
    gen = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(args.seed)
    printer = StreamPrinter(tok) if stream else None
    first_token_at = []
    t0 = time.perf_counter()

    def on_token(token_id):
        if not first_token_at:
            first_token_at.append(time.perf_counter())
        return printer(token_id) if printer else False

    out = model.generate(ids[-(model.cfg.block_size - 1):], max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         repetition_penalty=args.repetition_penalty, eos_id=tok.eos_id,
                         callback=on_token, generator=gen)
    t1 = time.perf_counter()
    if stream:
        printer.finish()
        print()
    if args.profile and out:
        ttft = first_token_at[0] - t0
        rate = (len(out) - 1) / (t1 - first_token_at[0]) if len(out) > 1 else float("nan")
        print(f"[profile] prompt {len(ids)} tokens | time to first token {1000 * ttft:.1f} ms | "
              f"{len(out)} tokens | decode {rate:.1f} tokens/s", file=sys.stderr)
    return tok.decode(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Nano inference (PyTorch)")
    p.add_argument("-m", "--model", required=True, help="checkpoint (.pt) written by train.py")
    p.add_argument("-l", "--lora", help="LoRA adapter checkpoint to attach")
    p.add_argument("-i", "--instruct", action="store_true", help="instruct (chat) mode")
    p.add_argument("--prompt", help="generate once for this prompt and exit")
    p.add_argument("-s", "--seed", type=int, default=0)
    p.add_argument("-t", "--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("-k", "--top-k", type=int, default=0, help="0 = off")
    p.add_argument("-p", "--top-p", type=float, default=0.95, help="1 = off")
    p.add_argument("-r", "--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("-n", "--max-new-tokens", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--profile", action="store_true", help="print time to first token and tokens/s")
    args = p.parse_args(argv)
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1 or args.repetition_penalty <= 0:
        p.error("need temperature >= 0, top_k >= 0, 0 < top_p <= 1, repetition_penalty > 0")
    return args


def load(args):
    ck = load_checkpoint(args.model)
    model = model_from_checkpoint(ck, args.model, args.device).eval()
    if "tokenizer" not in ck:
        raise ConfigError(f"{args.model} holds no tokenizer")
    tok = tokenizer_from_dict(ck["tokenizer"])
    adapter = None
    if args.lora:
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
            print("/quit  /mode (instruct <-> continue)  /lora (adapter on/off)")
            continue
        if cmd == "/mode":
            instruct = not instruct
            print(f"[{'instruct' if instruct else 'continue'} mode]")
            continue
        if cmd == "/lora":
            if adapter is None:
                print("[no adapter loaded: start with -l adapter.pt]")
            else:
                from model import set_lora_enabled
                adapter["enabled"] = not adapter.get("enabled", True)
                set_lora_enabled(model, adapter["enabled"])
                print(f"[adapter {'on' if adapter['enabled'] else 'off'}]")
            continue
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
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.prompt is not None:
        if not args.instruct:
            sys.stdout.write(args.prompt)
        generate_text(model, tok, args.prompt, args, args.instruct)
    else:
        repl(model, tok, adapter, args)


if __name__ == "__main__":
    main()
