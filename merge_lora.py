"""
Fold a LoRA adapter into its base model: a plain checkpoint whose logits equal base + adapter.

    python merge_lora.py checkpoint/pretrain/best.pt checkpoint/lora/adapter.pt checkpoint/merged.pt

The result loads like any checkpoint (infer.py -m, export.py --checkpoint) with no adapter
attached; the adapter's base identity is checked first, as infer.py -l does.
"""

import argparse
import sys

from files import NanoError, load_adapter, save_checkpoint
from hf import load_checkpoint
from model import attach_lora, merge_lora, model_from_checkpoint


def merged_checkpoint(base, base_path, adapter_path):
    """The checkpoint dict of base (a loaded checkpoint) with the adapter at adapter_path folded in
    (export.py --format hf --merge uses it too)."""
    adapter = load_adapter(adapter_path, base)
    model = merge_lora(attach_lora(model_from_checkpoint(base, base_path), adapter))
    return {"format": "nano-checkpoint", "version": 1, "model_config": base["model_config"],
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "tokenizer": base["tokenizer"], "merged_from": {"base": base_path, "adapter": adapter_path}}


def main(argv=None):
    p = argparse.ArgumentParser(description="Merge a LoRA adapter into its base checkpoint")
    p.add_argument("base", help="base checkpoint (.pt)")
    p.add_argument("adapter", help="adapter checkpoint (.pt) trained on that base")
    p.add_argument("out", help="merged checkpoint to write")
    args = p.parse_args(argv)
    try:
        merged = merged_checkpoint(load_checkpoint(args.base), args.base, args.adapter)
        save_checkpoint(merged, args.out)
    except NanoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
