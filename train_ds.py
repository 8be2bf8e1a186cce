"""
Sharded training with DeepSpeed ZeRO-3: the same loop as train.py, the model handed to a
DeepSpeed engine that partitions parameters, gradients and optimizer state across processes
(optionally offloading them to CPU memory), so models too big for one device's memory train.

    deepspeed --num_gpus 2 train_ds.py --deepspeed --deepspeed_config ds_config.json -m ... -t ...
    deepspeed --hostfile hostfile.txt train_ds.py --deepspeed --deepspeed_config ds_config.json -m ... -t ...
    torchrun --standalone --nproc_per_node 2 train_ds.py --deepspeed_config ds_config.json -m ... -t ...

On a machine without a GPU it runs on the CPU (DS_ACCELERATOR=cpu, gloo); DeepSpeed's first run
there compiles a communication op (about a minute). Batch fields in ds_config.json may be "auto"
(filled from the train config); given ones must agree: train_batch_size = micro x accum x world.

Checkpoints: out_dir/ds/ holds DeepSpeed's shards (what --resume reads: python train_ds.py ...
--resume); rank 0 also consolidates them into Nano's plain last.pt / best.pt, which infer.py and
export.py take directly. Consolidate by hand:

    python train_ds.py --consolidate checkpoint/pretrain_ds [--tag last] -o merged.pt
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported anywhere

import train  # noqa: E402
from files import ConfigError, read_json  # noqa: E402


def load_ds_config(path):
    ds = read_json(path, "DeepSpeed config")
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    ds = {k: v for k, v in ds.items() if not k.startswith("_")}  # "_comment" keys are ours, not DeepSpeed's
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0-3, got {stage!r}")
    if ds.get("bf16", {}).get("enabled") and not torch.cuda.is_available():
        # CPU runs (tests, CI) train in float32: bf16 on a CPU is slow and changes the numbers
        print(f"note: {path} asks for bf16; running on the CPU in float32", file=sys.stderr)
        ds["bf16"] = {"enabled": False}
    return ds


def main(argv=None):
    p = train.build_parser("Train a Nano model with DeepSpeed ZeRO (same loop and configs as train.py).")
    p.add_argument("--deepspeed", action="store_true", help="(accepted for the deepspeed launcher's convention)")
    p.add_argument("--deepspeed_config", default="ds_config.json", help="DeepSpeed JSON config")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument("--consolidate", metavar="RUN_DIR",
                   help="write a Nano checkpoint from RUN_DIR/ds (no training) to -o")
    p.add_argument("--tag", default="last", help="with --consolidate: the DeepSpeed tag")
    p.add_argument("-o", "--output", help="with --consolidate: the .pt to write")
    args = p.parse_args(argv)
    if args.consolidate:
        if not args.output:
            p.error("--consolidate needs -o OUT.pt")
        try:
            train.save_checkpoint(train.consolidate_deepspeed(os.path.join(args.consolidate, "ds"), args.tag),
                                  args.output)
        except (ConfigError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print(f"wrote {args.output}")
        return
    train.cli(args, load_ds_config=lambda: load_ds_config(args.deepspeed_config))


if __name__ == "__main__":
    main()
