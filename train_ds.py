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

from contextlib import nullcontext  # noqa: E402
from dataclasses import asdict  # noqa: E402

import torch.distributed as dist  # noqa: E402

import train  # noqa: E402
from files import ConfigError, NanoError, read_json, save_checkpoint, write_json  # noqa: E402


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


def batch_config(ds, cfg, world):
    """Fill DeepSpeed's batch fields from the train config ("auto" or absent), and refuse a config
    whose fields disagree with each other or with it: train_batch_size = micro x accumulation x world."""
    ds = dict(ds)
    micro, accum = cfg.batch_size, cfg.grad_accum // world
    want = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
            "train_batch_size": micro * accum * world}
    given = {k: ds[k] for k in want if k in ds and ds[k] != "auto"}
    for k, v in given.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"ds_config: {k} must be a positive integer or \"auto\", got {v!r}")
    if len(given) == 3 and given["train_batch_size"] != (given["train_micro_batch_size_per_gpu"]
                                                         * given["gradient_accumulation_steps"] * world):
        raise ConfigError(
            f"ds_config: train_batch_size ({given['train_batch_size']}) must equal train_micro_batch_size_per_gpu "
            f"({given['train_micro_batch_size_per_gpu']}) x gradient_accumulation_steps "
            f"({given['gradient_accumulation_steps']}) x world size ({world})")
    for k, v in given.items():
        if v != want[k]:
            raise ConfigError(f"ds_config: {k} is {v}, but the train config (batch_size {micro}, grad_accum "
                              f"{cfg.grad_accum} over {world} processes) means {want[k]}: make them agree, or "
                              f"set it to \"auto\"")
    ds.update(want)
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = cfg.grad_clip
    ds.setdefault("zero_force_ds_cpu_optimizer", False)  # Nano's AdamW (decay groups) also under offload
    ds.setdefault("steps_per_print", 10 ** 9)  # Nano logs; DeepSpeed's own step lines would repeat it
    return ds


def ds_meta(ds_dir):
    """The configs and tokenizer DeepSpeedEngine.save writes beside the shards (ds/nano.json)."""
    try:
        meta = read_json(os.path.join(ds_dir, "nano.json"), "DeepSpeed checkpoint")
    except ConfigError as e:
        raise ConfigError(f"{ds_dir} is not a Nano DeepSpeed checkpoint ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise ConfigError(f"{ds_dir}/nano.json: expected an object with model_config, train_config and tokenizer")
    return meta


def consolidate(ds_dir, tag="last"):
    """Nano's plain checkpoint (fp32 weights + configs + tokenizer) from a ZeRO checkpoint's shards."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    meta = ds_meta(ds_dir)
    state = get_fp32_state_dict_from_zero_checkpoint(ds_dir, tag=tag)
    return {"format": "nano-checkpoint", "version": 1, "model_config": meta["model_config"],
            "tokenizer": meta["tokenizer"], "train_config": meta["train_config"],
            "model": {k: v.detach().float().contiguous().cpu() for k, v in state.items()}}


def deepspeed_engine(ds_config):
    """The Engine class train.train() takes, for this DeepSpeed config."""
    return type("DeepSpeedEngine", (DeepSpeedEngine,), {"ds_config": ds_config})


class DeepSpeedEngine:
    """train.TorchEngine's members, with DeepSpeed doing the work: its engine runs the model (ZeRO-3
    gathers each module's parameters when it runs), the backward, the gradient sync, clipping and the
    optimizer step, in its own precision. Checkpoints: every rank writes its shards to out_dir/ds
    (what --resume reads); rank 0 then consolidates them into Nano's plain last.pt / best.pt."""
    ds_config = None  # set by deepspeed_engine()
    eval_on_every_rank = True  # ZeRO-3's forward is a collective

    def __init__(self, run):
        import deepspeed
        if run.cfg.mode == "lora":
            raise ConfigError("LoRA trains a few parameters and gains nothing from ZeRO-3: use train.py or train_ddp.py")
        if run.cfg.optimizer == "muon":  # (ZeRO-3 gives the optimizer flat shards of each matrix)
            raise ConfigError("optimizer muon orthogonalises whole matrices, which ZeRO-3 splits across ranks: "
                              "use train.py or train_ddp.py for muon, or optimizer adamw here")
        self.run = run
        ds = batch_config(self.ds_config, run.cfg, run.env.world)
        if "optimizer" in ds:  # DeepSpeed's own (e.g. its CPU Adam when the optimizer is offloaded)
            self.model, run.optimizer, _, _ = deepspeed.initialize(
                model=run.model, model_parameters=train.param_groups(run.model, run.cfg), config=ds)
        else:
            self.model, run.optimizer, _, _ = deepspeed.initialize(model=run.model, optimizer=run.optimizer, config=ds)
        run.env.dtype = "bfloat16" if ds.get("bf16", {}).get("enabled") else (
            "float16" if ds.get("fp16", {}).get("enabled") else "float32")
        run.autocast = nullcontext()  # the engine keeps the model in its own precision

    def accumulating(self, more_to_come):
        return nullcontext()  # DeepSpeed syncs at its own accumulation boundary

    def backward(self, loss):
        self.model.backward(loss, scale_wrt_gas=False)  # train_step already divided by the micro-batches
        self.model.step()  # (at a micro-batch that is not the boundary it only counts)

    def clip_and_update(self):
        grad_norm = self.model.get_global_grad_norm()  # (the step was taken in backward, at the boundary)
        return None if grad_norm is None else torch.as_tensor(float(grad_norm))

    def zero_grad(self):
        pass  # DeepSpeed's step clears them

    @staticmethod
    def resume_path(arg, out_dir):
        return out_dir if arg == "auto" else arg  # a run's folder: its shards are in ds/

    @staticmethod
    def resume_state(path):
        return ds_meta(os.path.join(path, "ds"))

    def restore(self, meta, out_dir):
        _, client = self.model.load_checkpoint(os.path.join(out_dir, "ds"), tag="last")
        if client is None:
            raise ConfigError(f"no DeepSpeed checkpoint to resume in {out_dir}/ds")
        train.restore_progress(self.run, client["step"], client["best_val_loss"], client["tokens_seen"],
                               client["sampler"], client["torch_rng"])

    def save(self, val_loss, best):
        run = self.run
        ds_dir = os.path.join(run.cfg.out_dir, "ds")
        rngs, _ = train.gather_rng(run)
        client = {"step": run.step, "best_val_loss": run.best_val, "tokens_seen": run.tokens_seen,
                  "sampler": run.sampler.get_state(), "torch_rng": rngs}
        self.model.save_checkpoint(ds_dir, tag="last", client_state=client)
        dist.barrier()  # all shards on disk before rank 0 reads them
        if not run.env.master:
            return
        write_json({"model_config": run.model_cfg.to_dict(), "tokenizer": run.data.tokenizer_spec,
                    "train_config": asdict(run.cfg)}, os.path.join(ds_dir, "nano.json"))
        st = consolidate(ds_dir, "last")
        st.update(step=run.step, val_loss=val_loss, best_val_loss=run.best_val, tokens_seen=run.tokens_seen)
        train.write_checkpoints(run, st, best)


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
            save_checkpoint(consolidate(os.path.join(args.consolidate, "ds"), args.tag), args.output)
        except (NanoError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print(f"wrote {args.output}")
        return
    try:
        ds_config = load_ds_config(args.deepspeed_config)
    except NanoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    train.cli(args, engine=deepspeed_engine(ds_config))


if __name__ == "__main__":
    main()
