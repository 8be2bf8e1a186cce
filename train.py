"""
Train a Nano model: one training loop for every entry point.

    python train.py -m config/model.json -t config/pretrain.json      # one device (CPU or GPU)
    python train.py ... --resume                                       # continue from out_dir/last.pt
    torchrun --nproc_per_node 2 train_ddp.py -m ... -t ...             # DDP (same loop, see train_ddp.py)

The loop (train(), at the end) is plain and visible: sample a batch, forward, backward (with
gradient accumulation), clip, step, and now and then log, evaluate and checkpoint. What it calls
is above it, in the order a run needs it: the config, the data, the model and optimizer, how a step
runs (eagerly, as a CUDA graph, or under DeepSpeed), checkpoints and logs.

Checkpoints are plain dicts of tensors and JSON-able values (torch.load(weights_only=True)),
written atomically (temp file, then rename):
  last.pt          full training state (model, optimizer, scaler, step, RNG, sampler), at every
                   eval, every `save_interval` steps, on Ctrl-C and at the end: what --resume reads
  best.pt          the same, from the step with the lowest validation loss so far
  step_<N>.pt      a snapshot every `save_interval` steps (when save_interval > 0)
"""

import argparse
import glob
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

PROCESS_START = time.time()  # eval lines report seconds since here: time-to-loss includes start-up
import torch.distributed as dist

import fast
from data import load_meta, load_sft_meta, load_sft_rows, load_tokens
from files import (ConfigError, DataError, OutputError, check_finite, dataclass_from_dict, load_checkpoint, load_json,
                   load_training_state, make_folder, read_json, save_checkpoint, weights_fingerprint, write_json)
from model import LoRAConfig, ModelConfig, Transformer, add_lora, adapter_checkpoint
from tokenizer import TokenizerError


@dataclass
class TrainConfig:
    mode: str = "pretrain"  # pretrain | sft | lora
    data_dir: str = "dataset/pretrain"  # made by data.py
    out_dir: str = "checkpoint/pretrain"
    init_from: Optional[str] = None  # a checkpoint to start from (sft / lora: the base model)
    batch_size: int = 16  # sequences per micro-step (per process)
    grad_accum: int = 1  # micro-steps per optimizer step, split across DDP ranks
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: Optional[int] = None  # cosine decay ends here (default: max_iters)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # always applied (0 = off)
    dropout: Optional[float] = None  # overrides the model config's dropout for this run
    eval_interval: int = 200
    eval_iters: int = 20  # batches per evaluation
    log_interval: int = 10
    save_interval: int = 0  # also write step_<N>.pt every N steps (0 = only last/best)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: bf16 on a GPU that has it)
    compile: bool = False
    # compile: Inductor times variants of each fused kernel's block sizes and keeps the fastest
    # (COMPILE_TUNING): minutes more compilation for a faster step
    compile_tuning: bool = False
    seed: int = 1337
    tensorboard: bool = True
    peak_flops: Optional[float] = None  # device peak FLOP/s for MFU; known GPUs are looked up
    lora: Optional[dict] = None  # mode lora: {"rank", "alpha", "dropout", "targets"} (model.LoRAConfig)
    target_val_loss: Optional[float] = None  # stop at the first eval at or below this (time-to-loss runs)
    save_on_eval: bool = True  # write last.pt / best.pt at every eval (False: only at the end / interrupt)
    data_on_device: str = "auto"  # auto | true | false: keep the token files in GPU memory (auto: < 1 GiB)
    save_checkpoints: bool = True  # False: write no checkpoint at all (bench.py: throughput only)
    activation_checkpointing: bool = False  # recompute each layer in the backward pass: less memory, ~1/3 more compute
    cuda_graph: bool = False  # capture the whole optimizer step as one CUDA graph and replay it (one GPU)
    # auto | true | false: train through fast.py's fused operations (auto: on CUDA without DeepSpeed,
    # and whenever fp8 is on); false: the reference model.py as it reads
    fast_path: str = "auto"
    fp8: str = "off"  # off | head | blocks | all: training products in float8 (output head, blocks' linear layers, both)
    # fp8: the forward and blocks' input-gradient products accumulate in the tensor cores' faster mode (fast.scaled_mm)
    fp8_fast_accum: bool = True
    # tokens per training window or SFT row (None: the model's block_size); shorter than the model's
    # context for models imported with long ones (hf.py: 8k-32k tokens), which a CPU cannot train whole
    seq_len: Optional[int] = None

    def validate(self, where="train config"):
        check_finite(self, where)
        if self.mode not in ("pretrain", "sft", "lora"):
            raise ConfigError(f"{where}: mode must be pretrain, sft or lora, got {self.mode!r}")
        for key in ("batch_size", "grad_accum", "max_iters", "eval_iters", "log_interval", "eval_interval"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}: {key} must be positive, got {getattr(self, key)}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ConfigError(f"{where}: seq_len must be at least 2 (or null: the model's block_size), got {self.seq_len}")
        for key in ("warmup_iters", "save_interval"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}: {key} must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.min_lr <= self.learning_rate or self.learning_rate <= 0:
            raise ConfigError(f"{where}: need 0 <= min_lr <= learning_rate and learning_rate > 0 (got {self.min_lr}, "
                              f"{self.learning_rate})")
        for key in ("beta1", "beta2"):  # AdamW's moving averages: a weight of 1 or more never forgets
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"{where}: {key} must be in [0, 1), got {getattr(self, key)}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(f"{where}: weight_decay and grad_clip must be >= 0 (grad_clip 0: no clipping), got "
                              f"{self.weight_decay} and {self.grad_clip}")
        for key in ("lr_decay_iters", "peak_flops"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"{where}: {key} must be positive (or null), got {getattr(self, key)}")
        if self.data_on_device not in ("auto", "true", "false"):
            raise ConfigError(f"{where}: data_on_device must be auto, true or false, got {self.data_on_device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"{where}: dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}: dropout must be in [0, 1), got {self.dropout}")
        if self.mode in ("sft", "lora") and not self.init_from:
            raise ConfigError(f"{where}: mode {self.mode!r} needs init_from (the base checkpoint)")
        if self.cuda_graph and self.dtype == "float16":
            raise ConfigError(f"{where}: cuda_graph does not support float16 (its loss scaler syncs with the host); "
                              "use bfloat16")
        if self.compile_tuning and not self.compile:
            raise ConfigError(f"{where}: compile_tuning needs compile=true")
        if self.fp8 not in fast.FP8_MODES:
            raise ConfigError(f"{where}: fp8 must be one of {fast.FP8_MODES}, got {self.fp8!r}")
        if self.fast_path not in ("auto", "true", "false"):
            raise ConfigError(f"{where}: fast_path must be auto, true or false, got {self.fast_path!r}")
        if self.fast_path == "false" and self.fp8 != "off":
            raise ConfigError(f"{where}: fp8 runs in the fast path (fast.py): set fast_path to auto or true, or fp8 off")
        if self.mode == "lora":
            self.lora_config()  # validates the nested dict
        elif self.lora is not None:
            raise ConfigError(f"{where}: key 'lora' applies only to mode 'lora'")

    def lora_config(self):
        return dataclass_from_dict(LoRAConfig, self.lora or {}, "train config: key 'lora'")


# The train-config keys that --resume lets change: where the run ends, how often it logs, evaluates
# and saves, and how fast it runs. Every other key (batch, schedule, optimizer, data, dtype, ...)
# would continue another run than the one in the checkpoint, and is refused.
SAFE_ON_RESUME = ("max_iters", "eval_interval", "eval_iters", "log_interval", "save_interval", "save_on_eval",
                  "save_checkpoints", "tensorboard", "target_val_loss", "peak_flops", "device", "data_on_device",
                  "compile", "compile_tuning", "cuda_graph", "fast_path", "activation_checkpointing", "data_dir",
                  "out_dir", "init_from")


def check_resume(ck, path, cfg, model_cfg):
    """Refuse to resume checkpoint ck with a model or train config that differs from its own in a key
    that is not SAFE_ON_RESUME; the message names each such key. (The data is checked by prepare:
    data_dir may move, but its tokens must be the same.)"""
    if ck.get("model_config") != model_cfg.to_dict():
        differ = sorted(k for k, v in model_cfg.to_dict().items() if ck.get("model_config", {}).get(k) != v)
        raise ConfigError(f"--resume {path}: the model config differs from the checkpoint's in {', '.join(differ)}: "
                          "resume without -m (the checkpoint's own model), or start a new run in another out_dir")
    saved, now = ck.get("train_config", {}), asdict(cfg)
    differ = [f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items()
              if k in saved and saved[k] != v and k not in SAFE_ON_RESUME]
    if differ:
        raise ConfigError(f"--resume {path}: the run in the checkpoint was trained with other settings: "
                          f"{'; '.join(differ)}. Resume with its own (leave them out), or start a new run in "
                          f"another out_dir. Keys that may change on resume: {', '.join(SAFE_ON_RESUME)}")


class Diverged(ValueError):
    """The loss or the gradient norm became non-finite: the run stops without saving."""

# ---------------------------------------------------------------------------
# Data: random windows from the token files that data.py writes


class PretrainData:
    """Token stream in train.bin / val.bin (np.memmap); a batch is B random windows of block_size + 1."""

    def __init__(self, data_dir, block_size, model_vocab):
        meta = load_meta(data_dir)  # checks meta.json against the .bin files
        self.meta = meta
        with open(os.path.join(data_dir, meta["tokenizer"]), encoding="utf-8") as f:
            self.tokenizer_spec = json.load(f)
        if meta["vocab_size"] > model_vocab:
            raise ConfigError(f"model config: vocab_size {model_vocab} is smaller than the data's tokenizer "
                              f"vocabulary ({meta['vocab_size']} in {data_dir}/meta.json)")
        self.split = {name: load_tokens(data_dir, name, meta) for name in ("train", "val")}
        for name, arr in self.split.items():
            if len(arr) < block_size + 2:
                raise ConfigError(f"model config: block_size {block_size} needs more tokens than the "
                                  f"{len(arr)} in {data_dir}/{name}.bin")
        self.block_size = block_size

    def num_windows(self, split):
        return len(self.split[split]) - self.block_size - 1

    def to_device(self, device):
        """Copy both splits into device memory once: a batch is then gathered on the device, with no
        per-step host work or transfer (worth it for corpora that fit, e.g. Tiny Shakespeare)."""
        self.split = {k: torch.from_numpy(np.asarray(v).astype(np.int64)).to(device) for k, v in self.split.items()}
        self.offsets = torch.arange(self.block_size + 1, device=device)

    def nbytes(self):
        return sum(8 * len(v) for v in self.split.values())

    def batch(self, split, starts):
        """x, y as int64 [len(starts), block_size]; y is x shifted by one."""
        arr, T = self.split[split], self.block_size
        if isinstance(arr, torch.Tensor):  # on the device already
            chunk = arr[starts.to(arr.device, non_blocking=True)[:, None] + self.offsets]
            return chunk[:, :-1], chunk[:, 1:]
        chunk = np.stack([arr[s:s + T + 1] for s in starts.tolist()]).astype(np.int64)
        chunk = torch.from_numpy(chunk)
        return chunk[:, :-1], chunk[:, 1:]

    def eval_starts(self, n):
        """A fixed set of n windows spread evenly over the val split: every evaluation sees the same data."""
        return torch.linspace(0, self.num_windows("val"), n).long()


class SFTData:
    """Rows of block_size + 1 tokens with a loss mask (data.py sft); a batch is B random rows.
    Targets whose mask is 0 (prompt, padding) become -1, which the loss ignores entirely.

    Unshifted rows (meta.json "shifted": false; problem.py writes them for its bidirectional tasks
    and for calc's auxiliary targets): {split}_targets.bin holds a second array shaped like
    {split}.bin, and input position t is trained on target position t (not on the next input
    token) wherever mask[t] is 1. A bidirectional row carries placeholders where the answer goes,
    so the model never sees what it must predict.
    The rows keep data.py's length of block_size + 1 (its size checks apply); the last column is unused."""

    def __init__(self, data_dir, block_size, model_vocab):
        meta = self.meta = load_sft_meta(data_dir)
        if meta["block_size"] != block_size:
            raise ConfigError(f"{data_dir} was made for block_size {meta['block_size']} but training uses {block_size} "
                              "(train config seq_len, else the model's block_size): rebuild it with "
                              f"python data.py sft --block-size {block_size}")
        if meta["vocab_size"] > model_vocab:
            raise ConfigError(f"model vocab_size {model_vocab} is smaller than the data's tokenizer ({meta['vocab_size']})")
        if meta["rows"]["val"] == 0:
            raise ConfigError(f"{data_dir} has no validation rows: rebuild with a larger --val-ratio")
        with open(os.path.join(data_dir, meta["tokenizer"]), encoding="utf-8") as f:
            self.tokenizer_spec = json.load(f)
        self.split = {name: load_sft_rows(data_dir, name, meta) for name in ("train", "val")}
        self.block_size = block_size
        self.targets = None  # shifted: the targets are the rows themselves, one token on
        if meta.get("shifted", True) is False:
            self.targets = {}
            for name, (ids, _) in self.split.items():
                path = os.path.join(data_dir, f"{name}_targets.bin")
                if not os.path.isfile(path) or os.path.getsize(path) != ids.nbytes:
                    raise DataError(f"{path} should hold {ids.shape[0]:,} target rows like {name}.bin")
                self.targets[name] = np.fromfile(path, dtype=ids.dtype).reshape(ids.shape)

    def num_windows(self, split):
        return len(self.split[split][0])

    def batch(self, split, rows):
        ids, mask = self.split[split]
        order = rows.tolist()
        x = torch.from_numpy(ids[order].astype(np.int64))
        m = torch.from_numpy(mask[order].astype(bool))
        if self.targets is not None:  # unshifted: position t is trained on target t
            y = torch.from_numpy(self.targets[split][order].astype(np.int64))
            return x[:, :-1], sft_targets(y[:, :-1], m[:, :-1])
        return x[:, :-1], sft_targets(x[:, 1:], m[:, 1:])

    def eval_starts(self, n):
        return torch.arange(min(n, self.num_windows("val")))


def sft_targets(next_tokens, mask):
    """The SFT targets: the next token where the mask marks an answer token or its <|eos|>, else -1."""
    return torch.where(mask, next_tokens, torch.full_like(next_tokens, -1))


def open_data(data_dir, block_size, model_vocab):
    """Pretraining windows or SFT rows, whichever data.py wrote in data_dir."""
    try:
        with open(os.path.join(data_dir, "meta.json"), encoding="utf-8") as f:
            kind = json.load(f).get("kind", "pretrain")
    except (OSError, ValueError, AttributeError):
        kind = "pretrain"  # let load_meta explain what is wrong
    cls = SFTData if kind == "sft" else PretrainData
    return cls(data_dir, block_size, model_vocab)


@torch.no_grad()
def eval_loss(model, data, n, batch_size, autocast=nullcontext(), to_device=lambda t: t):
    """Mean loss over the fixed validation set (n windows or rows); for SFT data only the answer
    tokens count, so this is the held-out answer loss."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in data.eval_starts(n).split(batch_size):
        x, y = data.batch("val", chunk)
        n_targets = int((y >= 0).sum())
        if n_targets == 0:  # a chunk of pure padding: its mean loss would be NaN
            continue
        with autocast:
            _, loss = model(to_device(x), to_device(y))
        total, count = total + loss.float() * n_targets, count + n_targets  # weight by targets
    model.train(was_training)
    return float(total / max(count, 1))


# ---------------------------------------------------------------------------
# Device, precision, distributed set-up


def pick_device(name):
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def pick_dtype(name, device):
    if name != "auto":
        return name
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


# Inductor setting behind train config compile_tuning (a torch.compile option): coordinate descent
# tries neighbouring block sizes and warp counts for each generated kernel and keeps the fastest.



PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


def peak_flops_for(device, override):
    if override:
        return override
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_BF16_FLOPS.items():
            if key in name:
                return flops
    return None  # unknown: MFU is not reported


def init_distributed():
    """Under torchrun (RANK/WORLD_SIZE set) join the process group; returns (rank, local_rank, world)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 0, 1
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return rank, local_rank, world




@dataclass
class Env:
    """Where this process trains: its rank among `world` processes, its device and dtype."""
    rank: int
    local_rank: int
    world: int
    device: str
    dtype: str  # float32 | bfloat16 | float16

    @property
    def master(self):
        return self.rank == 0

    @property
    def device_type(self):
        return "cuda" if self.device.startswith("cuda") else "cpu"


def cpu_threads():
    """torch's CPU threads: OMP_NUM_THREADS if set, else this process's cores less those that other
    processes keep busy (the 1-minute load average), at least 1. torch's default (every core)
    collapses when another job shares them: its threads wait for each other at every operation
    (docs/BENCHMARKS.md, threads under contention)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - busy)))


def setup_env(cfg):
    """Join the process group under torchrun, pick the device and dtype, seed torch's RNG."""
    torch.set_num_threads(cpu_threads())
    rank, local_rank, world = init_distributed()
    device = pick_device(cfg.device)
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    env = Env(rank, local_rank, world, device, pick_dtype(cfg.dtype, device))
    if cfg.grad_accum % world:
        raise ConfigError(f"train config: grad_accum ({cfg.grad_accum}) must be a multiple of the "
                          f"number of processes ({world})")
    torch.manual_seed(cfg.seed + rank)  # dropout differs per rank; data sampling is shared (the sampler)
    if env.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return env


def check_devices(cfg, env, deepspeed):
    """Refuse the train-config choices that this device or launcher cannot run; whether the step
    goes through the fast path (fast.py)."""
    where = f"device {env.device}, {env.world} processes{', DeepSpeed' if deepspeed else ''}"
    fp8_device = env.device_type == "cpu" or (env.device_type == "cuda"
                                              and torch.cuda.get_device_capability(env.device) >= (8, 9))
    if cfg.fp8 != "off" and (deepspeed or not fp8_device):  # (the CPU runs float8 products too: tests)
        raise ConfigError(f"train config: fp8 needs a GPU of compute capability 8.9 or later (H100, L4, RTX 40xx) "
                          f"or the CPU, and train.py or train_ddp.py (here: {where}); turn it off with --set fp8=off")
    if cfg.cuda_graph and (env.device_type != "cuda" or env.world > 1 or deepspeed):
        raise ConfigError(f"train config: cuda_graph needs one CUDA device and no DDP or DeepSpeed (here: {where}); "
                          "turn it off with --set cuda_graph=false")
    if cfg.fast_path == "true" and deepspeed:
        # ZeRO-3 gathers a module's parameters when that module runs: the fast path reads them itself
        raise ConfigError("train config: fast_path does not run under DeepSpeed; use auto or false")
    if cfg.fast_path == "auto":
        return not deepspeed and (env.device_type == "cuda" or cfg.fp8 != "off")
    return cfg.fast_path == "true"


# ---------------------------------------------------------------------------
# The model and its optimizer


def starting_point(model_cfg, cfg, resume, deepspeed):
    """The checkpoint to resume (or None), the base checkpoint (init_from, or None) and the model
    config the run trains: the base's, else the resumed run's, else the one given."""
    ck = load_training_state(resume) if (resume and not deepspeed) else None
    base = load_checkpoint(cfg.init_from) if cfg.init_from else None
    if base is not None:
        model_cfg = ModelConfig.from_dict(base["model_config"], f"{cfg.init_from}: model_config")
    if cfg.dropout is not None:
        model_cfg.dropout = cfg.dropout  # e.g. SFT with dropout on a base pretrained without
    if ck is not None:
        check_resume(ck, resume, cfg, model_cfg)
    if resume and deepspeed:  # the shards restore later (restore_deepspeed); their configs are checked now
        check_resume(deepspeed_meta(os.path.join(resume, "ds")), resume, cfg, model_cfg)
    return ck, base, model_cfg


def build_model(model_cfg, cfg, env, base, ck, resume):
    """The reference model on env.device: fresh (pretrain), or the base checkpoint's weights (sft,
    lora and pretrain with init_from), with a resumed run's own weights on top; mode lora freezes
    the base and adds adapters. Returns the model and, for lora, the identity of its base."""
    check_memory(model_cfg, env)
    # On a GPU the weights are made there: a multi-billion-parameter model (bench_multi_gpu.sh) would
    # otherwise spend minutes being initialised and copied from host memory, on every rank.
    with torch.device(env.device) if env.device_type == "cuda" else nullcontext():
        model = Transformer(model_cfg)
    if base is not None:
        model.load_state_dict(base["model"])
    lora_base = None  # mode lora: the identity of the frozen base, recorded in every adapter checkpoint
    if cfg.mode == "lora":
        lora_base = {"model_config": base["model_config"], "fingerprint": weights_fingerprint(
            base["model_config"], base["model"]), "path": cfg.init_from}
        for p in model.parameters():
            p.requires_grad_(False)
        add_lora(model, cfg.lora_config())  # only the adapters train (and reach the optimizer)
    if ck is not None:
        if cfg.mode == "lora":
            if ck.get("base", {}).get("fingerprint") != lora_base["fingerprint"]:
                raise ConfigError(f"{resume} is an adapter for another base than {cfg.init_from}")
            model.load_state_dict(ck["adapter"], strict=False)
        else:
            model.load_state_dict(ck["model"])
    model.checkpoint_layers = cfg.activation_checkpointing
    return model.to(env.device), lora_base


def check_memory(model_cfg, env):
    """Refuse a model whose weights alone do not fit the device's memory, before allocating them
    (training needs about four times as much more: gradients and AdamW's two moments)."""
    need = 4 * model_cfg.num_params()  # float32 weights
    if env.device_type == "cuda":
        have, where = torch.cuda.get_device_properties(env.device).total_memory, f"{env.device} has"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine has"
    if need > have:
        raise ConfigError(f"model config: {model_cfg.num_params():,} parameters need {need / 2 ** 30:,.1f} GiB for "
                          f"their float32 weights alone; {where} {have / 2 ** 30:,.1f} GiB")


def lr_at(step, cfg: TrainConfig):
    """Linear warmup to learning_rate, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay_iters:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def param_groups(model, cfg: TrainConfig):
    """Weight decay on matrices only (not on norms, biases or other 1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def make_optimizer(model, cfg: TrainConfig, device, capturable=False):
    """AdamW over param_groups; fused on CUDA. `capturable`: its step can be recorded in a CUDA graph
    (the step count stays on the GPU, and the learning rate is a GPU tensor that set_lr fills)."""
    lr = torch.tensor(cfg.learning_rate, device=device) if capturable else cfg.learning_rate
    return torch.optim.AdamW(param_groups(model, cfg), lr=lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.startswith("cuda"), capturable=capturable)


def clip_and_step(optimizer, params, grad_clip, scaler):
    """Clip the gradients of `params` (a list) to a global norm of grad_clip (0: no clipping), take
    the optimizer step and return the norm (None without clipping). Fused AdamW (CUDA) can divide
    the gradients by a GPU scalar as it reads them (its `grad_scale`, the hook GradScaler uses), so
    there the clipping factor goes in that way: no separate pass that reads and rewrites every
    gradient. With a float16 loss scaler, GradScaler owns that hook and clip_grad_norm_ rescales."""
    fold = optimizer.defaults.get("fused") and not scaler.is_enabled() and hasattr(torch.nn.utils, "get_total_norm")
    if not (grad_clip > 0 and fold):  # (older torch has no get_total_norm: clip_grad_norm_ then)
        grad_norm = None
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(optimizer)
        scaler.update()
        return grad_norm
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    # clip_grad_norm_ multiplies by grad_clip / (norm + 1e-6) where that is below 1: divide by its inverse
    optimizer.grad_scale = torch.clamp((grad_norm + 1e-6) / grad_clip, min=1.0)
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale
    return grad_norm


def set_lr(optimizer, lr):
    """Set every group's learning rate; a tensor learning rate (capturable optimizer) is filled in place,
    so that a captured CUDA graph, which reads that tensor, sees the new value."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr



def precision(env, cuda_graph):
    """The float16 loss scaler (off for other dtypes) and the autocast context of env.dtype."""
    scaler = torch.amp.GradScaler(env.device_type, enabled=(env.dtype == "float16"))
    # (under cuda_graph without autocast's weight cache: a cache made during capture cannot outlive it)
    autocast = (torch.autocast(env.device_type, dtype=getattr(torch, env.dtype), cache_enabled=not cuda_graph)
                if env.dtype != "float32" else nullcontext())
    return scaler, autocast


def step_model(model, cfg, env, use_fast):
    """What a training step calls: the reference model, or the fast path built from it
    (fast.FastTransformer), compiled if asked, wrapped for DDP under torchrun."""
    if use_fast:
        model = fast.FastTransformer(model, cfg.fp8, cfg.fp8_fast_accum)
        if cfg.fp8 in ("blocks", "all") and env.device_type == "cuda":
            fast.cublaslt_without_workspace()
    if cfg.compile:
        model = torch.compile(model, options=fast.compile_options(cfg))
    if env.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[env.local_rank] if env.device_type == "cuda" else None)
    return model


# ---------------------------------------------------------------------------
# One training run: its parts, and how it resumes


@dataclass
class Run:
    """What one training run holds, for the functions below: configs, data, the model (the
    reference, unwrapped) and what a step calls, the optimizer, and the progress that resume restores."""
    cfg: TrainConfig
    model_cfg: ModelConfig
    env: Env
    data: object  # PretrainData or SFTData
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object
    sampler: torch.Generator  # draws every batch: seeded the same on every rank
    lora_base: Optional[dict] = None
    engine: object = None  # the DeepSpeed engine (train_ds.py), which then runs the model and the step
    step_model: object = None  # what a step calls: the fast path, compiled, DDP or the DeepSpeed engine
    step: int = 0
    best_val: float = float("inf")
    tokens_seen: int = 0
    data_on_device: bool = False  # the token files copied into GPU memory (train config data_on_device)
    flops_per_token: int = 0  # for MFU; these three counted before ZeRO-3 partitions the parameters
    n_params: int = 0
    n_trainable: int = 0

    def to_device(self, x):
        if x.device.type == self.env.device_type:
            return x
        if self.env.device_type == "cuda":
            return x.pin_memory().to(self.env.device, non_blocking=True)
        return x.to(self.env.device)


def restore(run, ck):
    """Continue from checkpoint ck: optimizer, loss scaler, progress, and the sampler's and this
    rank's RNG state, so that the run goes on exactly as if it had not stopped."""
    rank, optimizer = run.env.rank, run.optimizer
    optimizer.load_state_dict(ck["optimizer"])
    for group in optimizer.param_groups:  # a number, or a GPU tensor for a capturable optimizer
        lr = float(group["lr"])
        group["lr"] = torch.tensor(lr, device=run.env.device) if run.cfg.cuda_graph else lr
    if ck.get("scaler"):
        run.scaler.load_state_dict(ck["scaler"])
    run.step, run.best_val, run.tokens_seen = ck["step"], ck["best_val_loss"], ck["tokens_seen"]
    run.sampler.set_state(ck["rng"]["sampler"])
    torch.set_rng_state(ck["rng"]["torch"][rank] if rank < len(ck["rng"]["torch"]) else ck["rng"]["torch"][0])
    if run.env.device_type == "cuda" and ck["rng"].get("cuda"):
        torch.cuda.set_rng_state(ck["rng"]["cuda"][min(rank, len(ck["rng"]["cuda"]) - 1)].cpu())


def next_batches(run):
    """This rank's micro-batches of the next optimizer step, on the device. One generator draws the
    offsets of all grad_accum micro-batches; rank r takes micro-batches r, r+world, ... So ranks
    read disjoint data and a DDP run sees exactly the batches of a single-process run."""
    cfg, env = run.cfg, run.env
    starts = torch.randint(run.data.num_windows("train"), (cfg.grad_accum, cfg.batch_size), generator=run.sampler)
    if run.data_on_device and env.device_type == "cuda":
        starts = starts.pin_memory().to(env.device, non_blocking=True)  # (pageable would wait for the GPU)
    batches = [run.data.batch("train", starts[env.rank + micro * env.world]) for micro in range(cfg.grad_accum // env.world)]
    return [(run.to_device(x), run.to_device(y)) for x, y in batches]


def evaluate(run):
    return eval_loss(run.model, run.data, run.cfg.eval_iters * run.cfg.batch_size, run.cfg.batch_size,
                     run.autocast, run.to_device)


# ---------------------------------------------------------------------------
# A training step: forward and backward over the micro-batches, clipping, the optimizer step


def forward_backward(run, batches):
    """The micro-steps of one optimizer step (this rank's share of grad_accum); the mean loss."""
    cfg, world, model = run.cfg, run.env.world, run.step_model
    loss_sum = torch.zeros((), device=run.env.device)
    for micro, (x, y) in enumerate(batches):
        if run.engine is not None:  # DeepSpeed scales for accumulation, syncs, clips and steps itself
            _, loss = run.engine(x, y)
            run.engine.backward(loss)
            run.engine.step()
            loss_sum += loss.detach().float() / cfg.grad_accum * world
            continue
        last_micro = micro == len(batches) - 1
        with model.no_sync() if (world > 1 and not last_micro) else nullcontext():  # DDP: sync once
            with run.autocast:
                _, loss = model(x, y)
            loss = loss / cfg.grad_accum * world  # DDP averages over ranks: this gives the global mean
            run.scaler.scale(loss).backward()
        loss_sum += loss.detach()
    return loss_sum


def update(run, params):
    """Clip and take the optimizer step (gradients are left for the caller to clear); the grad norm."""
    if run.engine is not None:
        grad_norm = run.engine.get_global_grad_norm()
        return None if grad_norm is None else torch.as_tensor(float(grad_norm))
    return clip_and_step(run.optimizer, params, run.cfg.grad_clip, run.scaler)


def eager_step(run, params, batches):
    """One optimizer step, run op by op: (mean loss, grad norm) as tensors."""
    loss_sum = forward_backward(run, batches)
    grad_norm = update(run, params)
    if run.engine is None:  # (DeepSpeed's step clears its own)
        run.optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


class CudaGraphStep:
    """train config cuda_graph: the first WARMUP steps run eagerly on a side stream (compilation,
    cuBLAS workspaces, optimizer state), then one whole step (every micro-step's forward and
    backward, clipping, AdamW) is captured once and replayed: one launch per step instead of
    hundreds of kernels, which is what a small model on a large GPU waits for. Replays read the
    batch from fixed input buffers and write the gradients into the tensors made during capture, so
    the gradients are not cleared between replays (the captured backward overwrites them)."""
    WARMUP = 3

    def __init__(self, run, params):
        self.run, self.params = run, params
        self.graph = self.inputs = self.outputs = None  # the graph, its input buffers and its outputs
        self.eager_steps = 0
        self.side_stream = torch.cuda.Stream()

    def __call__(self, batches):
        if self.graph is not None:
            for (x, y), (gx, gy) in zip(batches, self.inputs):
                gx.copy_(x, non_blocking=True)
                gy.copy_(y, non_blocking=True)
            self.graph.replay()
        elif self.eager_steps < self.WARMUP:
            self.eager_steps += 1
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream):
                out = eager_step(self.run, self.params, batches)
            torch.cuda.current_stream().wait_stream(self.side_stream)
            return out
        else:
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records, does not run: the replay below runs this step
                self.outputs = (forward_backward(self.run, batches), update(self.run, self.params))
            self.inputs = batches
            self.graph.replay()
        return self.outputs


# ---------------------------------------------------------------------------
# Checkpoints and logs


def training_state(run, val_loss):
    """The checkpoint dict of the run now: weights (or a LoRA run's adapters), configs, tokenizer,
    optimizer, scaler, progress and every RNG. A collective under DDP: every rank calls it."""
    cfg, env = run.cfg, run.env
    rng_torch = [torch.get_rng_state()]
    rng_cuda = [torch.cuda.get_rng_state()] if env.device_type == "cuda" else None
    if env.world > 1:  # every rank's dropout RNG, so that resume continues each rank's stream
        gathered = [None] * env.world
        dist.all_gather_object(gathered, (rng_torch[0], rng_cuda[0] if rng_cuda else None))
        rng_torch = [g[0] for g in gathered]
        rng_cuda = [g[1] for g in gathered] if rng_cuda else None
    training = {
        "train_config": asdict(cfg), "tokenizer": run.data.tokenizer_spec,
        "data_meta": {k: run.data.meta[k] for k in ("fingerprint", "vocab_size")},
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        "step": run.step, "best_val_loss": run.best_val, "val_loss": val_loss, "tokens_seen": run.tokens_seen,
        "rng": {"torch": rng_torch, "cuda": rng_cuda, "sampler": run.sampler.get_state()},
    }
    if cfg.mode == "lora":  # adapter-only: the base stays where init_from points
        return adapter_checkpoint(run.model, run.lora_base["model_config"], run.lora_base["fingerprint"],
                                  extra={**training, "model_config": run.model_cfg.to_dict()})
    return {"format": "nano-checkpoint", "version": 1, "model_config": run.model_cfg.to_dict(),
            "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()}, **training}


def save(run, val_loss=None, best=False):
    """Write last.pt (and best.pt, a LoRA run's adapter.pt, step_N.pt where due); never weights that
    are no longer finite (a diverged run keeps its last good checkpoint)."""
    cfg = run.cfg
    if not cfg.save_checkpoints:
        return
    if not all(torch.isfinite(p).all() for p in run.model.parameters() if p.requires_grad):
        raise Diverged(f"step {run.step}: the weights are no longer finite (NaN or infinity): the run diverged; "
                       f"{cfg.out_dir}/last.pt is left as it was (lower learning_rate, or check the data)")
    if run.engine is not None:
        return save_deepspeed(run, val_loss, best)
    st = training_state(run, val_loss)
    if not run.env.master:
        return
    make_folder(cfg.out_dir)
    save_checkpoint(st, os.path.join(cfg.out_dir, "last.pt"))
    if best:
        save_checkpoint(st, os.path.join(cfg.out_dir, "best.pt"))
        if cfg.mode == "lora":  # the adapter alone, without training state: the file to share
            slim = {k: st[k] for k in ("format", "version", "lora_config", "base", "adapter", "tokenizer")}
            save_checkpoint(slim, os.path.join(cfg.out_dir, "adapter.pt"))
    if cfg.save_interval and run.step % cfg.save_interval == 0:
        save_checkpoint(st, os.path.join(cfg.out_dir, f"step_{run.step}.pt"))


class Logger:
    """Plain-text log (out_dir/train.log) plus TensorBoard scalars; only the master process writes."""

    def __init__(self, out_dir, enabled, tensorboard):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        make_folder(out_dir)
        path = os.path.join(out_dir, "train.log")
        try:
            self.file = open(path, "a", encoding="utf-8")
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror.lower()}") from None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))

    def line(self, text):
        if self.enabled:
            print(text, flush=True)
            self.file.write(text + "\n")
            self.file.flush()

    def scalars(self, step, **values):
        if self.tb is not None:
            for k, v in values.items():
                if v is not None:
                    self.tb.add_scalar(k, v, step)

    def close(self):
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


class Throughput:
    """Tokens/s and ms/step over the steps since the last log line (evaluation time left out)."""

    def __init__(self, step):
        self.reset(step)

    def reset(self, step):
        self.time, self.step = time.time(), step

    def measure(self, step, tokens_per_step):
        dt, steps = time.time() - self.time, max(1, step - self.step)
        self.reset(step)
        return steps * tokens_per_step / max(dt, 1e-9), 1000 * dt / steps


def log_step(run, log, lr, loss_sum, grad_norm, throughput, peak, stats):
    """The step's log line and TensorBoard scalars (.item() syncs with the GPU: only at log time)."""
    if run.env.world > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    loss = loss_sum.item()
    tokens_per_step = run.cfg.batch_size * run.cfg.grad_accum * run.data.block_size
    tok_s, ms = throughput.measure(run.step, tokens_per_step)
    mfu = run.flops_per_token * tok_s / (peak * run.env.world) if peak else None  # per device
    gn = grad_norm.item() if grad_norm is not None else None
    check_finite_progress(run, loss=loss, grad_norm=gn)
    log.line(f"step {run.step} | loss {loss:.4f} | lr {lr:.2e} | grad_norm {gn if gn is None else f'{gn:.3f}'} | "
             f"{tok_s:,.0f} tok/s | {ms:.1f} ms/step" + (f" | mfu {100 * mfu:.1f}%" if mfu is not None else ""))
    log.scalars(run.step, **{"train/loss": loss, "train/lr": lr, "train/grad_norm": gn,
                             "perf/tokens_per_sec": tok_s, "perf/mfu": mfu})
    if stats is not None:
        stats.append({"step": run.step, "loss": loss, "tokens_per_sec": tok_s, "ms_per_step": ms, "mfu": mfu})


def check_finite_progress(run, **values):
    """Stop (Diverged) a run whose loss or gradient norm is NaN or infinite: its weights are
    garbage from here on, and must not overwrite the last good checkpoint."""
    bad = {k: v for k, v in values.items() if v is not None and not math.isfinite(v)}
    if bad:
        what = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in bad.items())
        raise Diverged(f"step {run.step}: {what}: the run diverged and stops without saving; {run.cfg.out_dir}/last.pt "
                       "is left as it was (lower learning_rate, raise warmup_iters, or check the data)")


def eval_and_save(run, log):
    """Evaluate (rank 0; under ZeRO-3 every rank, a collective forward), log, checkpoint as the
    config says; whether the run reached its target_val_loss."""
    cfg = run.cfg
    val = evaluate(run) if (run.env.master or run.engine is not None) else None
    if run.env.world > 1:
        box = [val]
        dist.broadcast_object_list(box, src=0)
        val = box[0]
    check_finite_progress(run, val_loss=val)
    best = val < run.best_val
    run.best_val = min(run.best_val, val)
    log.line(f"eval step {run.step} | val loss {val:.4f} | best {run.best_val:.4f} | "
             f"{time.time() - PROCESS_START:.1f} s since start")
    log.scalars(run.step, **{"val/loss": val})
    reached = cfg.target_val_loss is not None and val <= cfg.target_val_loss
    if cfg.save_on_eval or run.step == cfg.max_iters or reached:
        save(run, val, best)
    if reached:
        log.line(f"reached target val loss {cfg.target_val_loss} at step {run.step}, "
                 f"{time.time() - PROCESS_START:.1f} s after process start")
    return reached


# ---------------------------------------------------------------------------
# DeepSpeed ZeRO-3 (train_ds.py): the engine runs the model, the backward and the optimizer step


def deepspeed_batch_config(ds, cfg: TrainConfig, world):
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


def deepspeed_meta(ds_dir):
    """The configs and tokenizer save_deepspeed writes beside the shards (ds/nano.json)."""
    try:
        with open(os.path.join(ds_dir, "nano.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{ds_dir} is not a Nano DeepSpeed checkpoint (nano.json: {e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise ConfigError(f"{ds_dir}/nano.json: expected an object with model_config, train_config and tokenizer")
    return meta


def consolidate_deepspeed(ds_dir, tag="last"):
    """Nano's plain checkpoint (fp32 weights + configs + tokenizer) from a ZeRO checkpoint's shards."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    meta = deepspeed_meta(ds_dir)
    state = get_fp32_state_dict_from_zero_checkpoint(ds_dir, tag=tag)
    return {"format": "nano-checkpoint", "version": 1, "model_config": meta["model_config"],
            "tokenizer": meta["tokenizer"], "train_config": meta["train_config"],
            "model": {k: v.detach().float().contiguous().cpu() for k, v in state.items()}}



def deepspeed_engine(run, ds_config):
    """Hand the model (and Nano's optimizer, unless the config names DeepSpeed's own) to a
    DeepSpeed engine; the run then trains in the engine's precision."""
    import deepspeed
    if run.cfg.mode == "lora":
        raise ConfigError("LoRA trains a few parameters and gains nothing from ZeRO-3: use train.py or train_ddp.py")
    ds_config = deepspeed_batch_config(ds_config, run.cfg, run.env.world)
    if "optimizer" in ds_config:  # DeepSpeed's own (e.g. its CPU Adam when the optimizer is offloaded)
        run.engine, run.optimizer, _, _ = deepspeed.initialize(
            model=run.model, model_parameters=param_groups(run.model, run.cfg), config=ds_config)
    else:
        run.engine, run.optimizer, _, _ = deepspeed.initialize(model=run.model, optimizer=run.optimizer,
                                                               config=ds_config)
    run.env.dtype = "bfloat16" if ds_config.get("bf16", {}).get("enabled") else (
        "float16" if ds_config.get("fp16", {}).get("enabled") else "float32")
    run.autocast = nullcontext()  # the engine keeps the model in its own precision
    run.step_model = run.engine


def restore_deepspeed(run, out_dir):
    """Resume from DeepSpeed's own sharded checkpoint in out_dir/ds (model, optimizer, ...)."""
    _, client = run.engine.load_checkpoint(os.path.join(out_dir, "ds"), tag="last")
    if client is None:
        raise ConfigError(f"no DeepSpeed checkpoint to resume in {out_dir}/ds")
    run.step, run.best_val, run.tokens_seen = client["step"], client["best_val_loss"], client["tokens_seen"]
    run.sampler.set_state(client["sampler"])
    torch.set_rng_state(client["torch_rng"][min(run.env.rank, len(client["torch_rng"]) - 1)])


def save_deepspeed(run, val_loss, best):
    """Every rank writes its shard (resumable); rank 0 then consolidates Nano's plain checkpoint."""
    cfg, world = run.cfg, run.env.world
    ds_dir = os.path.join(cfg.out_dir, "ds")
    rngs = [None] * world
    dist.all_gather_object(rngs, torch.get_rng_state())
    client = {"step": run.step, "best_val_loss": run.best_val, "tokens_seen": run.tokens_seen,
              "sampler": run.sampler.get_state(), "torch_rng": rngs}
    run.engine.save_checkpoint(ds_dir, tag="last", client_state=client)
    dist.barrier()  # all shards on disk before rank 0 reads them
    if not run.env.master:
        return
    write_json({"model_config": run.model_cfg.to_dict(), "tokenizer": run.data.tokenizer_spec,
                "train_config": asdict(cfg)}, os.path.join(ds_dir, "nano.json"))
    st = consolidate_deepspeed(ds_dir, "last")
    st.update(step=run.step, val_loss=val_loss, best_val_loss=run.best_val, tokens_seen=run.tokens_seen)
    save_checkpoint(st, os.path.join(cfg.out_dir, "last.pt"))
    if best:
        save_checkpoint(st, os.path.join(cfg.out_dir, "best.pt"))
    if cfg.save_interval and run.step % cfg.save_interval == 0:
        save_checkpoint(st, os.path.join(cfg.out_dir, f"step_{run.step}.pt"))


# ---------------------------------------------------------------------------
# The training loop


RUN_FILES = ("last.pt", "best.pt", "adapter.pt", "train.log", "step_*.pt")


def keep_old_run(out_dir, overwrite):
    """A fresh run never silently replaces another: refuse an out_dir that holds one (checkpoints or
    a log), unless told to overwrite it, which removes that run's files first."""
    old = sorted(p for pattern in RUN_FILES for p in glob.glob(os.path.join(out_dir, pattern)))
    if old and not overwrite:
        raise ConfigError(f"{out_dir} already holds a run ({', '.join(os.path.basename(p) for p in old[:4])}"
                          f"{', ...' if len(old) > 4 else ''}): continue it with --resume, train into another folder "
                          "with --set out_dir=..., or replace it with --overwrite")
    for path in old:
        os.remove(path)


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (what a cluster scheduler sends before it kills a job) ask the
    run to stop at the next step boundary: the step under way finishes, last.pt is written with the
    state after it (weights, optimizer, RNG, sampler), and --resume continues exactly as if nothing
    had happened. A second signal stops at once, without saving; the last checkpoint stays whole
    (checkpoints are written to a temporary file and renamed)."""

    def __init__(self):
        self.received = None  # the first signal's number

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # (only there can Python take signals)
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step (again to stop now, without saving)",
              file=sys.stderr, flush=True)

    def agreed(self, run, log_step):
        """Whether the run stops here. Alone, at any step; under DDP or DeepSpeed every rank must stop
        at the same step, so the ranks agree at log steps (where they synchronise anyway)."""
        if run.env.world == 1:
            return self.received is not None
        if not log_step:
            return False
        flag = torch.tensor(float(self.received is not None), device=run.env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def prepare(model_cfg, cfg, resume, ds_config, overwrite=False):
    """Everything a run needs before its first step (the Run), from the configs, the data and, when
    resuming, the checkpoint."""
    cfg.validate()
    env = setup_env(cfg)
    if not resume and cfg.save_checkpoints and env.master:
        keep_old_run(cfg.out_dir, overwrite)
    deepspeed = ds_config is not None
    use_fast = check_devices(cfg, env, deepspeed)
    ck, base, model_cfg = starting_point(model_cfg, cfg, resume, deepspeed)
    if cfg.seq_len is not None and cfg.seq_len > model_cfg.block_size:
        raise ConfigError(f"train config: seq_len {cfg.seq_len} exceeds the model's block_size {model_cfg.block_size}")
    data = open_data(cfg.data_dir, cfg.seq_len or model_cfg.block_size, model_cfg.vocab_size)
    if ck is not None and (ck.get("tokenizer") != data.tokenizer_spec
                           or ck.get("data_meta", {}).get("fingerprint") != data.meta.get("fingerprint")):
        raise ConfigError(f"--resume {resume}: {cfg.data_dir} holds other data than the run was trained on "
                          f"(tokenizer or token files differ from those recorded in the checkpoint): point data_dir "
                          f"at the run's own dataset ({ck.get('train_config', {}).get('data_dir')})")
    if base is not None and base.get("tokenizer") != data.tokenizer_spec:
        raise ConfigError(f"{cfg.data_dir} was tokenized with another tokenizer than the base {cfg.init_from}: "
                          f"rebuild it with python data.py sft --tokenizer {cfg.init_from}")
    model, lora_base = build_model(model_cfg, cfg, env, base, ck, resume)
    del base
    optimizer = make_optimizer(model, cfg, env.device, capturable=cfg.cuda_graph)
    scaler, autocast = precision(env, cfg.cuda_graph)
    run = Run(cfg, model_cfg, env, data, model, optimizer, scaler, autocast,
              sampler=torch.Generator().manual_seed(cfg.seed), lora_base=lora_base,
              flops_per_token=model.flops_per_token(cfg.seq_len), n_params=model.num_params(),
              n_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    if deepspeed:
        deepspeed_engine(run, ds_config)
    if ck is not None:
        restore(run, ck)
    if deepspeed and resume:
        restore_deepspeed(run, resume)
    if not deepspeed:
        run.step_model = step_model(model, cfg, env, use_fast)
    on_device = {"true": True, "false": False}.get(cfg.data_on_device)
    if on_device is None:
        on_device = env.device_type == "cuda" and isinstance(data, PretrainData) and data.nbytes() < 2 ** 30
    if on_device:
        data.to_device(env.device)
        run.data_on_device = True
    return run


def train(model_cfg: ModelConfig, cfg: TrainConfig, resume=None, stop_at=None, quiet=False, ds_config=None,
          stats=None, profiler=None, overwrite=False):
    """Train and return the final (unwrapped) model. `resume`: a checkpoint path whose full state
    (model, optimizer, scaler, step, RNG, sampler) is restored; `stop_at`: end after this step as
    if interrupted (last.pt is written), e.g. to split a run in two. `ds_config`: a DeepSpeed config
    dict (train_ds.py): the model is handed to a DeepSpeed engine (ZeRO-3) that does the backward,
    the gradient sync and the optimizer step; `resume` is then the run's out_dir. `stats`: a list
    that receives one dict per log line (step, loss, tokens/s, ms/step, mfu): bench.py reads it;
    `profiler`: a torch.profiler.profile whose step() is called after every optimizer step;
    `overwrite`: a fresh run may replace the run already in out_dir (else that is refused)."""
    with StopSignals() as signals:  # from here Ctrl-C asks to stop at a step boundary
        run = prepare(model_cfg, cfg, resume, ds_config, overwrite)
        env = run.env
        log = Logger(cfg.out_dir, env.master and not quiet, cfg.tensorboard)
        tokens_per_step = cfg.batch_size * cfg.grad_accum * run.model_cfg.block_size
        log.line(f"mode {cfg.mode} | model: {run.n_params / 1e6:.2f}M parameters, {run.n_trainable / 1e6:.3f}M "
                 f"trained | device {env.device} {env.dtype} | world {env.world} | {tokens_per_step} tokens/step | "
                 f"{'resume from ' + resume + ' at step ' + str(run.step) if resume else 'fresh start'}, "
                 f"to step {cfg.max_iters}")
        if cfg.mode in ("sft", "lora") and run.step == 0:
            # the base model's held-out answer loss: the "before" that fine-tuning is measured against
            val0 = evaluate(run) if (env.master or run.engine is not None) else None
            if val0 is not None:
                log.line(f"eval step 0 | val loss {val0:.4f} | before fine-tuning")
                log.scalars(0, **{"val/loss": val0})
        params = list(run.model.parameters())  # what clipping measures
        take_step = CudaGraphStep(run, params) if cfg.cuda_graph else lambda batches: eager_step(run, params, batches)
        run.step_model.train()
        try:
            stopped = loop(run, log, signals, take_step, peak_flops_for(env.device, cfg.peak_flops), stats,
                           profiler, stop_at)
        except KeyboardInterrupt:  # a second signal: stop now
            log.line(f"interrupted again at step {run.step}: stopped without saving; the last checkpoint in "
                     f"{cfg.out_dir} is whole")
            stopped = signal.SIGINT
        finally:
            log.close()
    if stopped is not None:
        sys.exit(128 + stopped)  # 130 after Ctrl-C, 143 after SIGTERM
    return run.model


def loop(run, log, signals, take_step, peak, stats, profiler, stop_at):
    """The steps from run.step to max_iters (or an earlier stop); the signal that stopped it, if any."""
    cfg = run.cfg
    tokens_per_step = cfg.batch_size * cfg.grad_accum * run.model_cfg.block_size
    throughput = Throughput(run.step)
    log_now = False
    while True:
        if signals.agreed(run, log_now):  # at a step boundary: the state after the last step
            log.line(f"{signal.Signals(signals.received).name} at step {run.step}: writing {cfg.out_dir}/last.pt; "
                     "continue with --resume")
            save(run)
            return signals.received
        if run.step >= cfg.max_iters:
            return None
        lr = lr_at(run.step, cfg)
        set_lr(run.optimizer, lr)
        loss_sum, grad_norm = take_step(next_batches(run))
        if profiler is not None:  # bench.py --profile: a torch.profiler schedule counts steps
            profiler.step()
        run.step += 1
        run.tokens_seen += tokens_per_step

        log_now = run.step % cfg.log_interval == 0 or run.step == cfg.max_iters
        if log_now:
            log_step(run, log, lr, loss_sum, grad_norm, throughput, peak, stats)
        saved = False
        if run.step % cfg.eval_interval == 0 or run.step == cfg.max_iters:
            if eval_and_save(run, log):
                return None  # reached target_val_loss
            saved = cfg.save_on_eval or run.step == cfg.max_iters
            throughput.reset(run.step)  # evaluation time is not training throughput
        elif cfg.save_interval and run.step % cfg.save_interval == 0:
            save(run)
            saved = True
        if stop_at is not None and stop_at <= run.step < cfg.max_iters:
            if not saved:
                save(run)
            log.line(f"stopped at step {run.step} (--stop-at); continue with --resume")
            return None


# ---------------------------------------------------------------------------
# Command line


def build_parser(description="Train a Nano model (pretrain / sft / lora)."):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("-m", "--model", help="model config JSON (default: config/model.json)")
    p.add_argument("-t", "--train", help="train config JSON (default: config/pretrain.json)")
    p.add_argument("--resume", nargs="?", const="auto", help="resume from a checkpoint (default: out_dir/last.pt)")
    p.add_argument("--stop-at", type=int, help="stop after this step (writes last.pt; continue with --resume)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an out_dir that holds a run, removing it")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override train config keys, e.g. --set max_iters=100 device=cpu (values are JSON)")
    return p


def parse_settings(items):
    """--set KEY=VALUE strings into a dict; values are JSON where they parse (true, 3, 1e-3), else
    strings (device=cpu)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def load_configs(args, deepspeed=False):
    """The model and train configs of the command line, and the checkpoint path to resume from (or
    None). --resume continues the run it finds with that run's own configs; -m, -t and --set given
    beside it are checked against them (train(): check_resume)."""
    model_path = args.model or "config/model.json"
    train_path = args.train or "config/pretrain.json"
    model_cfg = load_json(model_path, ModelConfig)
    raw = read_json(train_path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{train_path}: expected a JSON object")
    overrides = parse_settings(args.set)
    train_cfg = dataclass_from_dict(TrainConfig, {**raw, **overrides}, train_path)
    resume = args.resume
    if resume == "auto":
        resume = train_cfg.out_dir if deepspeed else os.path.join(train_cfg.out_dir, "last.pt")
    if resume:
        ck = deepspeed_meta(os.path.join(resume, "ds")) if deepspeed else load_training_state(resume)
        if not args.model:
            model_cfg = ModelConfig.from_dict(ck["model_config"], f"{resume}: model_config")
        if not args.train:
            known = {k: v for k, v in ck.get("train_config", {}).items() if k in TrainConfig.__dataclass_fields__}
            train_cfg = dataclass_from_dict(TrainConfig, {**known, **overrides}, f"{resume}: train_config")
    return model_cfg, train_cfg, resume


def main(argv=None):
    cli(build_parser().parse_args(argv))


def cli(args, load_ds_config=None):
    """Load the configs named on the command line and train; user errors exit with code 2."""
    code = 0
    try:
        ds_config = load_ds_config() if load_ds_config else None
        model_cfg, train_cfg, resume = load_configs(args, deepspeed=ds_config is not None)
        train(model_cfg, train_cfg, resume=resume, stop_at=args.stop_at, ds_config=ds_config, overwrite=args.overwrite)
        if dist.is_initialized():
            dist.barrier()  # rank 0 may still be writing its checkpoint: leave together
    except (ConfigError, DataError, TokenizerError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        code = 3
    except KeyboardInterrupt:  # a second Ctrl-C before the loop began
        print("interrupted", file=sys.stderr)
        code = 130
    except SystemExit as e:  # a signal inside train() exits 130 / 143 after saving
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        if not dist.is_initialized():
            raise
        import traceback
        traceback.print_exc()
        code = 1
    if dist.is_initialized():
        leave_distributed(code)
    if code:
        sys.exit(code)


def leave_distributed(code):
    """Destroy the process group, then end the process without interpreter finalisation: gloo's
    worker threads can still hold tensors of the last collectives, and freeing those while Python
    shuts down aborts the process now and then ("terminate called without an active exception",
    SIGABRT, about one 2-process CPU run in six here)."""
    try:
        dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
