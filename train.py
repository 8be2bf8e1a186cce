"""
Train a Nano model: one training loop for every entry point.

    python train.py -m config/model.json -t config/pretrain.json      # one device (CPU or GPU)
    python train.py ... --resume                                       # continue from out_dir/last.pt
    torchrun --nproc_per_node 2 train_ddp.py -m ... -t ...             # DDP: this loop, one process per device
    deepspeed ... train_ds.py ...                                      # ZeRO-3: this loop, DeepSpeed's engine

The story is in two functions: train(), near the end, is the loop (sample a batch, take a step, now
and then log, evaluate and checkpoint); train_step() is one optimizer step, whole (forward and
backward over the micro-batches, clipping, the update). Above them, in the order a run needs them: the config,
where the run trains, the model and its optimizer, checkpoints and logs. How fast the step runs
(float8 module swaps, torch.compile, CUDA graphs) comes from speed.py; the data readers from data.py;
DeepSpeed's specifics from train_ds.py, through the same small Engine interface TorchEngine has here.

Checkpoints are plain dicts of tensors and JSON-able values (torch.load(weights_only=True)),
written atomically (temp file, then rename):
  last.pt          full training state (model, optimizer, scaler, step, RNG, sampler), at every
                   eval, every `save_interval` steps, on Ctrl-C and at the end: what --resume reads
  best.pt          the same, from the step with the lowest validation loss so far
  step_<N>.pt      a snapshot every `save_interval` steps (when save_interval > 0)
"""

import time

PROCESS_START = time.time()  # eval lines report seconds since here, before the libraries load (a second or more
# for torch): time-to-loss figures include the whole start-up
import os  # noqa: E402
import signal  # noqa: E402

if __name__ == "__main__":  # Ctrl-C while the libraries load (seconds): exit 130 at once, not a traceback
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))  # (nothing is written yet; an exception here
    # would surface inside whatever C extension is loading)

import argparse  # noqa: E402
import glob
import json
import math
import sys
import threading
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch  # noqa: E402

TORCH_IMPORTED = time.time()  # (time-to-loss figures before 2026-12-05 were counted from here)
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import muon
import speed
from data import PretrainData, open_data
from eval import EvalError, during_training, load_tasks
from files import (ConfigError, NanoError, OutputError, check_finite, dataclass_from_dict, load_json,
                   load_training_state, make_folder, read_json, save_checkpoint, weights_fingerprint)
from hf import load_checkpoint
from model import LoRAConfig, ModelConfig, Transformer, add_lora, adapter_checkpoint
from tokenizer import tokenizer_from_dict

# ---------------------------------------------------------------------------
# The train config


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
    lr_decay_iters: Optional[int] = None  # the decay ends here (default: max_iters)
    lr_schedule: str = "cosine"  # cosine | wsd: warmup, then cosine to min_lr, or stable then a linear cool-down
    cooldown_frac: float = 0.4  # wsd: the last fraction of the decay iterations that cool down linearly
    optimizer: str = "adamw"  # adamw | muon: Muon for the hidden matrices, AdamW for the rest (muon.py)
    muon_lr: float = 0.02  # muon: the hidden matrices' peak learning rate (learning_rate is AdamW's)
    muon_momentum: float = 0.95  # muon: the momentum after its warmup from 0.85 (muon.py)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # always applied (0 = off)
    dropout: Optional[float] = None  # overrides the model config's dropout for this run
    eval_interval: int = 200
    eval_iters: int = 20  # batches per evaluation: eval_iters x batch_size validation windows or rows
    eval_batch_size: Optional[int] = None  # sequences per forward of an evaluation (None: batch_size); the same
    # windows either way; fewer, larger forwards for a GPU, where a small model's batches wait on kernel launches
    log_interval: int = 10
    save_interval: int = 0  # also write step_<N>.pt every N steps (0 = only last/best)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: bf16 on a GPU that has it)
    compile: bool = False
    compile_tuning: bool = False  # compile: Inductor tunes its kernels' block sizes (speed.COMPILE_TUNING)
    seed: int = 1337
    tensorboard: bool = True
    peak_flops: Optional[float] = None  # device peak FLOP/s for MFU; known GPUs are looked up
    lora: Optional[dict] = None  # mode lora: {"rank", "alpha", "dropout", "targets"} (model.LoRAConfig)
    target_val_loss: Optional[float] = None  # stop at the first eval at or below this (time-to-loss runs)
    save_on_eval: bool = True  # write last.pt / best.pt at every eval (False: only at the end / interrupt)
    data_on_device: object = "auto"  # auto | true | false: keep the token files in GPU memory (auto: < 1 GiB)
    save_checkpoints: bool = True  # False: write no checkpoint at all (bench.py: throughput only)
    activation_checkpointing: bool = False  # recompute each layer in the backward pass: less memory, ~1/3 more compute
    cuda_graph: bool = False  # capture the whole optimizer step as one CUDA graph and replay it (one GPU)
    fp8: str = "off"  # off | head | blocks | all: training products in float8 (speed.py)
    fp8_fast_accum: bool = True  # fp8: forward products accumulate in the tensor cores' faster mode
    # the head's loss and its gradient as one Triton kernel (speed_kernels.py; CUDA with Triton). None: on
    # with the float8 head (fp8 head / all), where it pays (speed.loss_kernel_on)
    loss_kernel: Optional[bool] = None
    # tokens per training window or SFT row (None: the model's block_size); shorter than the model's
    # context for models imported with long ones (hf.py: 8k-32k tokens), which a CPU cannot train whole
    seq_len: Optional[int] = None
    # eval.py's tasks at every evaluation: names in ../shared/data/eval and/or .jsonl paths, separated by
    # commas (None: none), the first eval_limit items of each; their scores and the val split's bits
    # per byte go to train.log and TensorBoard
    eval_tasks: Optional[str] = None
    eval_limit: int = 100

    def validate(self, where="train config"):
        check_finite(self, where)
        if self.mode not in ("pretrain", "sft", "lora"):
            raise ConfigError(f"{where}: mode must be pretrain, sft or lora, got {self.mode!r}")
        for key in ("batch_size", "grad_accum", "max_iters", "eval_iters", "log_interval", "eval_interval"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}: {key} must be positive, got {getattr(self, key)}")
        if self.batch_size > 2 ** 20 or self.grad_accum > 2 ** 20:
            raise ConfigError(f"{where}: batch_size and grad_accum must be at most {2 ** 20:,}")
        if self.eval_batch_size is not None and not 0 < self.eval_batch_size <= 2 ** 20:
            raise ConfigError(f"{where}: eval_batch_size must be in [1, {2 ** 20:,}] (or null: batch_size), "
                              f"got {self.eval_batch_size}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ConfigError(f"{where}: seq_len must be at least 2 (or null: the model's block_size), got {self.seq_len}")
        for key in ("warmup_iters", "save_interval"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}: {key} must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.min_lr <= self.learning_rate or self.learning_rate <= 0:
            raise ConfigError(f"{where}: need 0 <= min_lr <= learning_rate and learning_rate > 0 (got {self.min_lr}, "
                              f"{self.learning_rate})")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"{where}: lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0 < self.cooldown_frac <= 1:
            raise ConfigError(f"{where}: cooldown_frac must be in (0, 1], got {self.cooldown_frac}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"{where}: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.muon_lr <= 0:
            raise ConfigError(f"{where}: muon_lr must be positive, got {self.muon_lr}")
        if self.optimizer == "muon" and self.mode == "lora":
            raise ConfigError(f"{where}: optimizer muon orthogonalises whole hidden matrices; LoRA trains "
                              "low-rank adapters: use optimizer adamw")
        for key in ("beta1", "beta2", "muon_momentum"):  # moving averages: a weight of 1 or more never forgets
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"{where}: {key} must be in [0, 1), got {getattr(self, key)}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(f"{where}: weight_decay and grad_clip must be >= 0 (grad_clip 0: no clipping), got "
                              f"{self.weight_decay} and {self.grad_clip}")
        for key in ("lr_decay_iters", "peak_flops"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"{where}: {key} must be positive (or null), got {getattr(self, key)}")
        if not 0 <= self.seed < 2 ** 63:
            raise ConfigError(f"{where}: seed must be in [0, 2^63), got {self.seed}")
        # yes/no settings take JSON booleans; the strings "true" / "false" (older configs) mean the same
        if isinstance(self.data_on_device, str):
            self.data_on_device = {"true": True, "false": False}.get(self.data_on_device, self.data_on_device)
        if not (self.data_on_device is True or self.data_on_device is False or self.data_on_device == "auto"):
            raise ConfigError(f"{where}: data_on_device must be \"auto\", true or false, got {self.data_on_device!r}")
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
        if self.fp8 not in speed.FP8_MODES:
            raise ConfigError(f"{where}: fp8 must be one of {speed.FP8_MODES}, got {self.fp8!r}")
        if self.eval_limit <= 0:
            raise ConfigError(f"{where}: eval_limit must be positive, got {self.eval_limit}")
        if self.eval_tasks is not None:
            try:
                load_tasks(self.eval_tasks, limit=self.eval_limit)  # the names and the files' items, now
            except EvalError as e:
                raise ConfigError(f"{where}: eval_tasks: {e}") from None
        if self.mode == "lora":
            self.lora_config()  # validates the nested dict
        elif self.lora is not None:
            raise ConfigError(f"{where}: key 'lora' applies only to mode 'lora'")

    def lora_config(self):
        return dataclass_from_dict(LoRAConfig, self.lora or {}, "train config: key 'lora'")


LR_SCHEDULES = ("cosine", "wsd")
OPTIMIZERS = ("adamw", "muon")


# The config keys that --resume lets change: where the run ends, how often it logs, evaluates and
# saves, and how fast it runs (of the model config, sdpa_kernel: how attention is computed, not what;
# config/model_56m.json took "triton"). Every other key (batch, schedule, optimizer, data, dtype, the
# model's shape, ...) would continue another run than the one in the checkpoint, and is refused.
SAFE_ON_RESUME = ("max_iters", "eval_interval", "eval_iters", "eval_batch_size", "log_interval", "save_interval",
                  "save_on_eval", "save_checkpoints", "tensorboard", "target_val_loss", "peak_flops", "device",
                  "data_on_device", "compile", "compile_tuning", "cuda_graph", "loss_kernel",
                  "activation_checkpointing", "data_dir", "out_dir", "init_from", "eval_tasks", "eval_limit",
                  "sdpa_kernel")


def check_resume(ck, path, cfg, model_cfg):
    """Refuse to resume checkpoint ck with a model or train config that differs from its own in a key
    that is not SAFE_ON_RESUME; the message names each such key. (The data is checked by prepare:
    data_dir may move, but its tokens must be the same.)"""
    # a checkpoint from before a model-config key existed trained with that key's default (issue #34's options)
    saved_model = {**{f.name: f.default for f in fields(ModelConfig)}, **ck.get("model_config", {})}
    differ = sorted(k for k, v in model_cfg.to_dict().items() if saved_model.get(k) != v and k not in SAFE_ON_RESUME)
    if differ:
        raise ConfigError(f"--resume {path}: the model config differs from the checkpoint's in {', '.join(differ)}: "
                          "resume without -m (the checkpoint's own model), or start a new run in another out_dir")
    saved, now = ck.get("train_config", {}), asdict(cfg)
    differ = [f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items()
              if k in saved and saved[k] != v and k not in SAFE_ON_RESUME]
    if differ:
        raise ConfigError(f"--resume {path}: the run in the checkpoint was trained with other settings: "
                          f"{'; '.join(differ)}. Resume with its own (leave them out), or start a new run in "
                          f"another out_dir. Keys that may change on resume: {', '.join(SAFE_ON_RESUME)}")


class Diverged(NanoError):
    """The loss or the gradient norm became non-finite: the run stops without saving."""


# ---------------------------------------------------------------------------
# Where the run trains: processes, device, precision


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


def busy_cores(cpus, interval=0.25):
    """How many of the CPUs `cpus` other processes keep busy now: their share of non-idle time in
    /proc/stat over `interval` seconds, summed. The load average would also count a job that ended
    a minute ago (a previous run), so back-to-back runs would get one thread on an idle machine.
    None where /proc/stat is not there (not Linux)."""
    def sample():
        times = {}
        try:
            with open("/proc/stat") as f:
                for line in f:
                    name, *fields = line.split()
                    if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                        values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
                        times[int(name[3:])] = (sum(values), values[3] + values[4])
        except (OSError, ValueError, IndexError):
            return None
        return times
    before = sample()
    time.sleep(interval)
    after = sample()
    if not before or not after:
        return None
    busy = 0.0
    for cpu in before.keys() & after.keys():
        total, idle = after[cpu][0] - before[cpu][0], after[cpu][1] - before[cpu][1]
        busy += 1 - idle / total if total > 0 else 0.0
    return busy


def cpu_threads(device="cpu"):
    """torch's CPU threads: OMP_NUM_THREADS if set, else this process's cores less those that other
    processes keep busy right now (busy_cores), at least 1. torch's default (every core) collapses
    when another job shares them: its threads wait for each other at every operation
    (docs/BENCHMARKS.md, threads under contention). On a GPU the CPU only gathers batches, so the
    load average stands in for busy_cores' quarter-second measurement, which every start-up waited for."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    busy = busy_cores(cpus) if device.startswith("cpu") else None
    if busy is None:
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(len(cpus), round(len(cpus) - busy)))


def pick_device(name):
    """The device of train config `device`, refused in one line if this machine has no such device."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train config: device {name!r} is not a device name (cpu, cuda, cuda:N, mps or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train config: device {name!r}, but this machine has no CUDA GPU (use cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"train config: device {name!r}, but this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train config: device {name!r}, but MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"train config: device {name!r}: Nano trains on cpu, cuda or mps")
    return name


def pick_dtype(name, device):
    if name != "auto":
        return name
    return "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"


def setup_env(cfg):
    """Join the process group under torchrun (RANK / WORLD_SIZE set), pick the device and dtype,
    seed torch's RNG."""
    device = pick_device(cfg.device)
    torch.set_num_threads(cpu_threads(device))
    rank, local_rank, world = 0, 0, 1
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
    if cfg.grad_accum % world:  # each rank takes whole micro-batches of the step (next_batches)
        same = (f"--set batch_size={cfg.batch_size // world} grad_accum={cfg.grad_accum * world} keeps the batch "
                f"of one process ({cfg.batch_size * cfg.grad_accum} sequences a step); " if cfg.batch_size % world == 0 else "")
        raise ConfigError(f"train config: grad_accum ({cfg.grad_accum}) must be a multiple of the number of "
                          f"processes ({world}), which share each step's micro-batches: {same}--set "
                          f"grad_accum={world * cfg.grad_accum} makes the batch {world} times larger")
    env = Env(rank, local_rank, world, device, pick_dtype(cfg.dtype, device))
    torch.manual_seed(cfg.seed + rank)  # dropout differs per rank; data sampling is shared (the sampler)
    if env.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return env


def check_devices(cfg, model_cfg, env, engine):
    """Refuse the train-config choices that this device or launcher cannot run."""
    where = f"device {env.device}, {env.world} processes, {engine.__name__}"
    fp8_device = env.device_type == "cpu" or (env.device_type == "cuda"
                                              and torch.cuda.get_device_capability(env.device) >= (8, 9))
    if cfg.fp8 != "off" and (engine is not TorchEngine or not fp8_device):  # (the CPU runs float8 too: tests)
        raise ConfigError(f"train config: fp8 needs a GPU of compute capability 8.9 or later (H100, L4, RTX 40xx) "
                          f"or the CPU, and train.py or train_ddp.py (here: {where}); turn it off with --set fp8=off")
    if cfg.fp8 in ("head", "all") and model_cfg.logit_softcap is not None:
        raise ConfigError(f"train config: fp8 {cfg.fp8} computes the head and the loss in one step without the "
                          f"model's logit_softcap: use --set fp8=blocks (or off)")
    if cfg.cuda_graph and (env.device_type != "cuda" or env.world > 1 or engine is not TorchEngine):
        raise ConfigError(f"train config: cuda_graph needs one CUDA device and no DDP or DeepSpeed (here: {where}); "
                          "turn it off with --set cuda_graph=false")
    if cfg.loss_kernel is True and (env.device_type != "cuda" or not speed.TRITON or engine is not TorchEngine
                                    or model_cfg.logit_softcap is not None):
        raise ConfigError(f"train config: loss_kernel needs a CUDA device with Triton (CUDA builds of torch have it), "
                          f"train.py or train_ddp.py, and a model without logit_softcap (here: {where}, softcap "
                          f"{model_cfg.logit_softcap}); turn it off with --set loss_kernel=false")


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


# ---------------------------------------------------------------------------
# The model and its optimizer


def starting_point(model_cfg, cfg, resume, engine):
    """The state to resume (or None), the base checkpoint (init_from, or None) and the model config
    the run trains: the base's, else the one given (load_configs already took a resumed run's)."""
    ck = engine.resume_state(resume) if resume else None
    base = load_checkpoint(cfg.init_from) if cfg.init_from else None
    if base is not None:
        model_cfg = ModelConfig.from_dict(base["model_config"], f"{cfg.init_from}: model_config")
    if cfg.dropout is not None:
        model_cfg.dropout = cfg.dropout  # e.g. SFT with dropout on a base pretrained without
    if ck is not None:
        check_resume(ck, resume, cfg, model_cfg)
    return ck, base, model_cfg


def build_model(model_cfg, cfg, env, base, ck, resume):
    """The model on env.device: fresh (pretrain), or the base checkpoint's weights (sft, lora and
    pretrain with init_from), with a resumed run's own weights on top; mode lora freezes the base and
    adds adapters. Returns the model and, for lora, the identity of its base."""
    check_memory(model_cfg, cfg, env)
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
    if ck is not None and cfg.mode == "lora":
        if ck.get("base", {}).get("fingerprint") != lora_base["fingerprint"]:
            raise ConfigError(f"{resume} is an adapter for another base than {cfg.init_from}")
        model.load_state_dict(ck["adapter"], strict=False)
    elif ck is not None and "model" in ck:  # (DeepSpeed restores its shards itself: TrainDS.restore)
        model.load_state_dict(ck["model"])
    model.checkpoint_layers = cfg.activation_checkpointing
    return model.to(env.device), lora_base


def check_memory(model_cfg, cfg, env):
    """Refuse, before allocating anything, a run whose training state cannot fit: float32 weights,
    their gradients and AdamW's two moments (16 bytes a parameter), and the batch of token ids."""
    n = model_cfg.num_params()
    need = 16 * n + 16 * cfg.batch_size * (cfg.seq_len or model_cfg.block_size)
    if env.device_type == "cuda":
        have, where = torch.cuda.get_device_properties(env.device).total_memory, f"{env.device} has"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine has"
    if need > have:
        raise ConfigError(f"{n:,} parameters and a batch of {cfg.batch_size} need at least {need / 2 ** 30:,.1f} GiB "
                          f"to train (weights, gradients and AdamW's moments in float32); {where} "
                          f"{have / 2 ** 30:,.1f} GiB: a smaller model or batch_size")


def lr_at(step, cfg: TrainConfig):
    """Linear warmup to learning_rate, then to min_lr at lr_decay_iters (min_lr after it): a cosine
    (lr_schedule cosine), or learning_rate held until the last cooldown_frac of the decay iterations
    and a straight line down (wsd, warmup-stable-decay: the long linear cool-down of the NanoGPT speedrun)."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay_iters:
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        cooldown_start = max(cfg.warmup_iters, decay_iters - cfg.cooldown_frac * decay_iters)
        ratio = max(0.0, step - cooldown_start) / max(1, decay_iters - cooldown_start)
        return cfg.learning_rate - ratio * (cfg.learning_rate - cfg.min_lr)
    ratio = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def param_groups(model, cfg: TrainConfig):
    """Weight decay on matrices only (not on norms, biases or other 1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def make_optimizer(model, cfg: TrainConfig, device):
    """AdamW over param_groups, fused on CUDA; or optimizer muon (muon.Muon: Muon for the hidden
    matrices, AdamW for the rest). Under cuda_graph the step is recorded in the graph: AdamW's
    `capturable` keeps the step count on the GPU (Muon's counts are always there), and each group's
    learning rate is a GPU tensor that set_lr fills in place (a captured graph reads that tensor, so
    it sees each new value)."""
    if cfg.optimizer == "muon":
        optimizer = muon.Muon(model, cfg.learning_rate, cfg.muon_lr, cfg.muon_momentum, (cfg.beta1, cfg.beta2),
                              weight_decay=cfg.weight_decay)
        if cfg.cuda_graph:
            for group in optimizer.param_groups:
                group["lr"] = torch.tensor(group["lr"], device=device)
        return optimizer
    lr = torch.tensor(cfg.learning_rate, device=device) if cfg.cuda_graph else cfg.learning_rate
    return torch.optim.AdamW(param_groups(model, cfg), lr=lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.startswith("cuda"), capturable=cfg.cuda_graph)


def set_lr(optimizer, lr):
    """Every group's learning rate for this step: lr, times the group's own ratio to it where it has
    one (muon.Muon's hidden matrices run at muon_lr / learning_rate times the schedule)."""
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


# ---------------------------------------------------------------------------
# The training step


@dataclass
class Run:
    """What one training run holds: configs, data, the model (unwrapped), the optimizer, the engine
    that runs the step, and the progress that resume restores."""
    cfg: TrainConfig
    model_cfg: ModelConfig
    env: Env
    data: object  # data.PretrainData or data.SFTData
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    autocast: object
    sampler: torch.Generator  # draws every batch: seeded the same on every rank
    tokens_per_step: int  # batch_size x grad_accum x the window (seq_len, else block_size): counted once
    flops_per_token: int  # for MFU; counted before ZeRO-3 partitions the parameters, as is n_params
    peak_flops: Optional[float]  # the device's, for MFU (None: unknown, no MFU reported)
    n_params: int
    n_trained: int
    lora_base: Optional[dict] = None
    engine: object = None  # TorchEngine, or train_ds.DeepSpeedEngine
    step: int = 0
    best_val: float = float("inf")
    tokens_seen: int = 0
    data_on_device: bool = False

    def to_device(self, x):
        if x.device.type == self.env.device_type:
            return x
        if self.env.device_type == "cuda":
            return x.pin_memory().to(self.env.device, non_blocking=True)
        return x.to(self.env.device)


class TorchEngine:
    """How train_step's parts run in plain PyTorch, on one device or under DDP: the model as the step
    calls it (speed.py's swaps, compiled, DDP-wrapped), the backward (through the float16 loss scaler
    where there is one), clipping and the optimizer step, and checkpoints. train_ds.DeepSpeedEngine
    has the same members for ZeRO-3."""
    eval_on_every_rank = False  # evaluation runs on rank 0 alone

    def __init__(self, run):
        cfg, env = run.cfg, run.env
        self.run, self.optimizer = run, run.optimizer
        self.scaler = torch.amp.GradScaler(env.device_type, enabled=env.dtype == "float16")
        self.params = [p for p in run.model.parameters() if p.requires_grad]
        # (speed.FusedLossHead computes the loss without logit_softcap: such a model keeps its own head)
        fused_head = env.device_type == "cuda" and run.model_cfg.logit_softcap is None
        speed.make_fast(run.model, cfg.fp8, fused_head=fused_head, fast_accum=cfg.fp8_fast_accum,
                        loss_kernel=speed.loss_kernel_on(cfg.loss_kernel, env.device_type, cfg.fp8))
        model = run.model
        if cfg.compile:
            model = torch.compile(model, options=speed.compile_options(cfg.compile_tuning))
        if env.world > 1:
            model = DistributedDataParallel(model, device_ids=[env.local_rank] if env.device_type == "cuda" else None)
        self.model = model

    def accumulating(self, more_to_come):
        """DDP: sum the gradients of all but the last micro-batch locally, and sync once."""
        return self.model.no_sync() if more_to_come and self.run.env.world > 1 else nullcontext()

    def backward(self, loss):
        self.scaler.scale(loss).backward()

    def clip_and_update(self):
        """Clip the gradients to a global norm of grad_clip (0: not at all), take the optimizer step;
        the norm before clipping (a tensor; None without clipping)."""
        grad_norm = None
        if self.run.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.run.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return grad_norm

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    @staticmethod
    def resume_path(arg, out_dir):
        """--resume's checkpoint: out_dir/last.pt for a bare --resume, a run folder's last.pt, or the file."""
        path = out_dir if arg == "auto" else arg
        return os.path.join(path, "last.pt") if os.path.isdir(path) or arg == "auto" else path

    @staticmethod
    def resume_state(path):
        return load_training_state(path)

    def restore(self, ck, resume):
        """Continue from checkpoint ck: optimizer, loss scaler, progress, and the sampler's and this
        rank's RNG state, so that the run goes on exactly as if it had not stopped."""
        run = self.run
        self.optimizer.load_state_dict(ck["optimizer"])
        for group in self.optimizer.param_groups:  # a number, or a GPU tensor for a capturable optimizer
            group["lr"] = torch.tensor(float(group["lr"]), device=run.env.device) if run.cfg.cuda_graph \
                else float(group["lr"])
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        restore_progress(run, ck["step"], ck["best_val_loss"], ck["tokens_seen"], ck["rng"]["sampler"],
                         ck["rng"]["torch"], ck["rng"].get("cuda"))

    def save(self, val_loss, best):
        st = training_state(self.run, val_loss, self.optimizer.state_dict(),
                            self.scaler.state_dict() if self.scaler.is_enabled() else None)
        if self.run.env.master:
            write_checkpoints(self.run, st, best)


def train_step(run, batches):
    """One optimizer step, whole: clear the gradients, forward and backward over this process's
    micro-batches (each loss divided by their number, so the gradients add up to the mean's; DDP
    then averages over the processes), clip, update. The mean loss and the gradient norm, as tensors
    (reading them would wait for the GPU). speed.CudaGraphStep records exactly this function."""
    engine = run.engine
    engine.zero_grad()  # first: in a CUDA graph the backward then makes the gradients in the graph's memory
    loss_sum = torch.zeros((), device=run.env.device)
    for i, (x, y) in enumerate(batches):
        with engine.accumulating(more_to_come=i < len(batches) - 1):
            with run.autocast:
                _, loss = engine.model(x, y)
            loss = loss / len(batches)
            engine.backward(loss)
        loss_sum += loss.detach().float()
    grad_norm = engine.clip_and_update()
    return loss_sum, grad_norm


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


def evaluate(run):
    """The validation loss, on rank 0 (under ZeRO-3 on every rank: its forward is a collective),
    shared with every rank."""
    val = None
    if run.env.master or run.engine.eval_on_every_rank:
        val = eval_loss(run.model, run.data, run.cfg.eval_iters * run.cfg.batch_size,
                        run.cfg.eval_batch_size or run.cfg.batch_size, run.autocast, run.to_device)
    if run.env.world > 1:
        box = [val]
        dist.broadcast_object_list(box, src=0)
        val = box[0]
    return val


# ---------------------------------------------------------------------------
# Checkpoints and logs


def training_state(run, val_loss, optimizer_state, scaler_state):
    """The checkpoint dict of the run now: weights (or a LoRA run's adapters), configs, tokenizer,
    optimizer, scaler, progress and every RNG. A collective under DDP: every rank calls it."""
    cfg, env = run.cfg, run.env
    rng_torch, rng_cuda = gather_rng(run)
    training = {
        "train_config": asdict(cfg), "tokenizer": run.data.tokenizer_spec,
        "data_meta": {k: run.data.meta[k] for k in ("fingerprint", "vocab_size")},
        "optimizer": optimizer_state, "scaler": scaler_state,
        "step": run.step, "best_val_loss": run.best_val, "val_loss": val_loss, "tokens_seen": run.tokens_seen,
        "rng": {"torch": rng_torch, "cuda": rng_cuda if env.device_type == "cuda" else None,
                "sampler": run.sampler.get_state()},
    }
    if cfg.mode == "lora":  # adapter-only: the base stays where init_from points
        return adapter_checkpoint(run.model, run.lora_base["model_config"], run.lora_base["fingerprint"],
                                  extra={**training, "model_config": run.model_cfg.to_dict()})
    return {"format": "nano-checkpoint", "version": 1, "model_config": run.model_cfg.to_dict(),
            "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()}, **training}


def gather_rng(run):
    """Every rank's torch (and CUDA) RNG state, so that resume continues each rank's dropout stream."""
    mine = (torch.get_rng_state(), torch.cuda.get_rng_state() if run.env.device_type == "cuda" else None)
    states = [mine]
    if run.env.world > 1:
        states = [None] * run.env.world
        dist.all_gather_object(states, mine)
    return [s[0] for s in states], [s[1] for s in states]


def restore_progress(run, step, best_val, tokens_seen, sampler_state, torch_rngs, cuda_rngs=None):
    """The progress and RNG streams of a checkpoint, this rank's own where it has one."""
    run.step, run.best_val, run.tokens_seen = step, best_val, tokens_seen
    run.sampler.set_state(sampler_state)
    torch.set_rng_state(torch_rngs[min(run.env.rank, len(torch_rngs) - 1)])
    if run.env.device_type == "cuda" and cuda_rngs and cuda_rngs[0] is not None:
        torch.cuda.set_rng_state(cuda_rngs[min(run.env.rank, len(cuda_rngs) - 1)].cpu())


def write_checkpoints(run, st, best):
    """last.pt, and best.pt, a LoRA run's adapter.pt and step_N.pt where due (rank 0)."""
    cfg = run.cfg
    make_folder(cfg.out_dir)
    save_checkpoint(st, os.path.join(cfg.out_dir, "last.pt"))
    if best:
        save_checkpoint(st, os.path.join(cfg.out_dir, "best.pt"))
        if cfg.mode == "lora":  # the adapter alone, without training state: the file to share
            slim = {k: st[k] for k in ("format", "version", "lora_config", "base", "adapter", "tokenizer")}
            save_checkpoint(slim, os.path.join(cfg.out_dir, "adapter.pt"))
    if cfg.save_interval and run.step % cfg.save_interval == 0:
        save_checkpoint(st, os.path.join(cfg.out_dir, f"step_{run.step}.pt"))


def save(run, val_loss=None, best=False):
    """Checkpoint the run (engine.save); never weights that are no longer finite (a diverged run
    keeps its last good checkpoint)."""
    if not run.cfg.save_checkpoints:
        return
    if not all(torch.isfinite(p).all() for p in run.model.parameters() if p.requires_grad):
        raise Diverged(f"step {run.step}: the weights are no longer finite (NaN or infinity): the run diverged; "
                       f"{run.cfg.out_dir}/last.pt is left as it was (lower learning_rate, or check the data)")
    run.engine.save(val_loss, best)


def check_finite_progress(run, **values):
    """Stop (Diverged) a run whose loss or gradient norm is NaN or infinite: its weights are
    garbage from here on, and must not overwrite the last good checkpoint."""
    bad = {k: v for k, v in values.items() if v is not None and not math.isfinite(v)}
    if bad:
        what = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in bad.items())
        raise Diverged(f"step {run.step}: {what}: the run diverged and stops without saving; {run.cfg.out_dir}/last.pt "
                       "is left as it was (lower learning_rate, raise warmup_iters, or check the data)")


class Logger:
    """Plain-text log (out_dir/train.log) plus TensorBoard scalars; only the master process writes.
    A log that cannot be written (a full disk) stops the run with one line (OutputError)."""

    def __init__(self, out_dir, enabled, tensorboard):
        self.enabled, self.tb, self.path = enabled, None, os.path.join(out_dir, "train.log")
        if not enabled:
            return
        make_folder(out_dir)
        try:
            self.file = open(self.path, "a", encoding="utf-8")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter  # (a second to import: only when asked)
                self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {(e.strerror or str(e)).lower()}") from None

    def line(self, text):
        if self.enabled:
            print(text, flush=True)
            try:
                self.file.write(text + "\n")
                self.file.flush()
            except OSError as e:
                raise OutputError(f"cannot write {self.path}: {(e.strerror or str(e)).lower()}") from None

    def scalars(self, step, **values):
        if self.tb is not None:
            for k, v in values.items():
                if v is not None:
                    self.tb.add_scalar(k, v, step)

    def close(self):
        if self.enabled:
            try:
                self.file.close()
            except OSError:
                pass  # (a full disk: what could be written was, and the run already said so)
            if self.tb is not None:
                self.tb.close()


def log_step(run, log, lr, loss_sum, grad_norm, timer, stats):
    """The step's log line and TensorBoard scalars (.item() waits for the GPU: only at log time):
    loss, learning rate, gradient norm, throughput, MFU, and the time left at this pace."""
    if run.env.world > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    loss = loss_sum.item()
    gn = grad_norm.item() if grad_norm is not None else None
    check_finite_progress(run, loss=loss, grad_norm=gn)
    dt, steps = time.time() - timer["time"], max(1, run.step - timer["step"])
    timer.update(time=time.time(), step=run.step)
    tok_s, ms = steps * run.tokens_per_step / max(dt, 1e-9), 1000 * dt / steps
    mfu = run.flops_per_token * tok_s / (run.peak_flops * run.env.world) if run.peak_flops else None
    eta = (run.cfg.max_iters - run.step) * ms / 1000
    log.line(f"step {run.step}/{run.cfg.max_iters} | loss {loss:.4f} | lr {lr:.2e} | grad_norm "
             f"{gn if gn is None else f'{gn:.3f}'} | {tok_s:,.0f} tok/s | {ms:.1f} ms/step"
             + (f" | mfu {100 * mfu:.1f}%" if mfu is not None else "") + f" | eta {format_duration(eta)}")
    log.scalars(run.step, **{"train/loss": loss, "train/lr": lr, "train/grad_norm": gn,
                             "perf/tokens_per_sec": tok_s, "perf/mfu": mfu})
    if stats is not None:
        stats.append({"step": run.step, "loss": loss, "tokens_per_sec": tok_s, "ms_per_step": ms, "mfu": mfu})


def format_duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ---------------------------------------------------------------------------
# The run: set-up, then the loop


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


def warn_unused_vocab(model_cfg, data, cfg, env, base):
    """A model whose vocabulary is far larger than the data's tokenizer trains embedding rows that
    no token ever uses (model_56m.json's 16,384 on the default 4,096-token data): say so once. A base
    model's vocabulary is the base's, and a padded one (50,304 for GPT-2's 50,257) is no mistake."""
    used = data.meta["vocab_size"]
    if base is None and env.master and model_cfg.vocab_size > -(-used // 128) * 128:
        print(f"warning: the model's vocab_size is {model_cfg.vocab_size:,} but {cfg.data_dir}'s tokenizer has "
              f"{used:,} tokens: {model_cfg.vocab_size - used:,} embedding rows will never be used; prepare the "
              f"data with python data.py --vocab-size {model_cfg.vocab_size} (or use a model config with vocab_size "
              f"{used})", file=sys.stderr)


def prepare(model_cfg, cfg, resume, engine, overwrite=False):
    """Everything a run needs before its first step (the Run), from the configs, the data and, when
    resuming, the checkpoint."""
    cfg.validate()
    env = setup_env(cfg)
    if not resume and cfg.save_checkpoints and env.master:
        keep_old_run(cfg.out_dir, overwrite)
    ck, base, model_cfg = starting_point(model_cfg, cfg, resume, engine)
    check_devices(cfg, model_cfg, env, engine)
    if cfg.seq_len is not None and cfg.seq_len > model_cfg.block_size:
        raise ConfigError(f"train config: seq_len {cfg.seq_len} exceeds the model's block_size {model_cfg.block_size}")
    data = open_data(cfg.data_dir, cfg.seq_len or model_cfg.block_size, model_cfg.vocab_size)
    if ck is not None and (ck.get("tokenizer") != data.tokenizer_spec
                           or ck.get("data_meta", {}).get("fingerprint", data.meta.get("fingerprint"))
                           != data.meta.get("fingerprint")):
        raise ConfigError(f"--resume {resume}: {cfg.data_dir} holds other data than the run was trained on "
                          f"(tokenizer or token files differ from those recorded in the checkpoint): point data_dir "
                          f"at the run's own dataset ({ck.get('train_config', {}).get('data_dir')})")
    if base is not None and base.get("tokenizer") != data.tokenizer_spec:
        raise ConfigError(f"{cfg.data_dir} was tokenized with another tokenizer than the base {cfg.init_from}: "
                          f"rebuild it with python data.py sft --tokenizer {cfg.init_from}")
    warn_unused_vocab(model_cfg, data, cfg, env, base)
    model, lora_base = build_model(model_cfg, cfg, env, base, ck, resume)
    del base
    autocast = (torch.autocast(env.device_type, dtype=getattr(torch, env.dtype), cache_enabled=not cfg.cuda_graph)
                if env.dtype != "float32" else nullcontext())  # (a weight cache made in a capture cannot outlive it)
    run = Run(cfg, model_cfg, env, data, model, make_optimizer(model, cfg, env.device), autocast,
              sampler=torch.Generator().manual_seed(cfg.seed), lora_base=lora_base,
              tokens_per_step=cfg.batch_size * cfg.grad_accum * data.block_size,
              flops_per_token=model.flops_per_token(data.block_size),
              peak_flops=peak_flops_for(env.device, cfg.peak_flops), n_params=model.num_params(),
              n_trained=sum(p.numel() for p in model.parameters() if p.requires_grad))
    run.engine = engine(run)
    if ck is not None:
        run.engine.restore(ck, resume)
    on_device = cfg.data_on_device
    if on_device == "auto":
        on_device = env.device_type == "cuda" and isinstance(data, PretrainData) and data.nbytes() < 2 ** 30
    if on_device:
        data.to_device(env.device)
        run.data_on_device = True
    return run


def train(model_cfg: ModelConfig, cfg: TrainConfig, resume=None, stop_at=None, quiet=False, stats=None,
          profiler=None, overwrite=False, engine=TorchEngine):
    """Train and return the final model (unwrapped). `resume`: a checkpoint path whose full state
    (model, optimizer, scaler, step, RNG, sampler) is restored; `stop_at`: end after this step as
    if interrupted (last.pt is written), e.g. to split a run in two; `stats`: a list that receives
    one dict per log line (step, loss, tokens/s, ms/step, mfu), which bench.py reads; `profiler`: a
    torch.profiler.profile whose step() is called after every optimizer step; `overwrite`: a fresh
    run may replace the run already in out_dir (else that is refused); `engine`: TorchEngine, or
    train_ds.DeepSpeedEngine (ZeRO-3; `resume` is then the run's out_dir)."""
    with StopSignals() as signals:  # from here Ctrl-C asks to stop at a step boundary
        run = prepare(model_cfg, cfg, resume, engine, overwrite)
        env = run.env
        log = Logger(cfg.out_dir, env.master and not quiet, cfg.tensorboard)
        log.line(f"mode {cfg.mode} | model: {run.n_params / 1e6:.2f}M parameters, {run.n_trained / 1e6:.3f}M trained | device "
                 f"{env.device} {env.dtype} | world {env.world} | {run.tokens_per_step} tokens/step | "
                 f"{'resume from ' + resume + ' at step ' + str(run.step) if resume else 'fresh start'}, "
                 f"to step {cfg.max_iters}")
        if cfg.mode in ("sft", "lora") and run.step == 0:
            # the base model's held-out answer loss: the "before" that fine-tuning is measured against
            val0 = evaluate(run)
            log.line(f"eval step 0 | val loss {val0:.4f} | before fine-tuning")
            log.scalars(0, **{"val/loss": val0})
        step = lambda batches: train_step(run, batches)  # noqa: E731
        if cfg.cuda_graph:
            step = speed.CudaGraphStep(step)
        run.engine.model.train()
        stopped = None
        timer = {"time": time.time(), "step": run.step}  # tokens/s over the steps since the last log line
        log_now = False
        try:
            while run.step < cfg.max_iters:
                if signals.agreed(run, log_now):  # at a step boundary: the state after the last step
                    log.line(f"{signal.Signals(signals.received).name} at step {run.step}: writing "
                             f"{cfg.out_dir}/last.pt; continue with --resume")
                    save(run)
                    stopped = signals.received
                    break
                lr = lr_at(run.step, cfg)
                set_lr(run.optimizer, lr)
                loss_sum, grad_norm = step(next_batches(run))
                if profiler is not None:  # bench.py --profile: a torch.profiler schedule counts steps
                    profiler.step()
                run.step += 1
                run.tokens_seen += run.tokens_per_step

                log_now = run.step % cfg.log_interval == 0 or run.step == cfg.max_iters
                if log_now:
                    log_step(run, log, lr, loss_sum, grad_norm, timer, stats)
                saved = False
                if run.step % cfg.eval_interval == 0 or run.step == cfg.max_iters:
                    if eval_and_save(run, log):
                        break  # reached target_val_loss
                    saved = cfg.save_on_eval or run.step == cfg.max_iters
                    timer.update(time=time.time(), step=run.step)  # evaluation time is not training throughput
                elif cfg.save_interval and run.step % cfg.save_interval == 0:
                    save(run)
                    saved = True
                if stop_at is not None and stop_at <= run.step < cfg.max_iters:
                    if not saved:
                        save(run)
                    log.line(f"stopped at step {run.step} (--stop-at); continue with --resume")
                    break
        except KeyboardInterrupt:  # a second signal: stop now
            log.line(f"interrupted again at step {run.step}: stopped without saving; the last checkpoint in "
                     f"{cfg.out_dir} is whole")
            stopped = signal.SIGINT
        finally:
            log.close()
    if stopped is not None:
        sys.exit(128 + stopped)  # 130 after Ctrl-C, 143 after SIGTERM
    return run.model


def eval_and_save(run, log):
    """Evaluate, log, checkpoint as the config says; whether the run reached its target_val_loss."""
    cfg = run.cfg
    val = evaluate(run)
    check_finite_progress(run, val_loss=val)
    best = val < run.best_val
    run.best_val = min(run.best_val, val)
    log.line(f"eval step {run.step} | val loss {val:.4f} | best {run.best_val:.4f} | "
             f"{time.time() - PROCESS_START:.1f} s since start")
    log.scalars(run.step, **{"val/loss": val})
    if cfg.eval_tasks and run.env.master and not run.engine.eval_on_every_rank:  # (not under ZeRO-3's sharded forward)
        scores = during_training(run.model, tokenizer_from_dict(run.data.tokenizer_spec),
                                 load_tasks(cfg.eval_tasks, limit=cfg.eval_limit), run.autocast,
                                 run.data.split["val"] if isinstance(run.data, PretrainData) else None,
                                 cfg.eval_iters * cfg.batch_size * run.data.block_size)
        log.line(f"eval step {run.step} | " + " | ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        log.scalars(run.step, **scores)
    reached = cfg.target_val_loss is not None and val <= cfg.target_val_loss
    if cfg.save_on_eval or run.step == cfg.max_iters or reached:
        save(run, val, best)
    if reached:
        now = time.time()
        log.line(f"reached target val loss {cfg.target_val_loss} at step {run.step}, "
                 f"{now - PROCESS_START:.1f} s after process start ({now - TORCH_IMPORTED:.1f} s after torch's import)")
    return reached


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
        except (json.JSONDecodeError, RecursionError):
            out[key] = value
    return out


def load_configs(args, engine=TorchEngine):
    """The model and train configs of the command line, and the checkpoint path to resume from (or
    None). --resume continues the run it finds with that run's own configs; -m, -t and --set given
    beside it are checked against them (starting_point: check_resume)."""
    model_path = args.model or "config/model.json"
    train_path = args.train or "config/pretrain.json"
    model_cfg = load_json(model_path, ModelConfig)
    raw = read_json(train_path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{train_path}: expected a JSON object")
    overrides = parse_settings(args.set)
    typos = {k: v for k, v in overrides.items() if k not in TrainConfig.__dataclass_fields__}
    if typos:  # the key came from --set, not from the config file: name --set alone
        dataclass_from_dict(TrainConfig, typos, f"--set {' '.join(args.set)}")
    where = f"{train_path} with --set {' '.join(args.set)}" if overrides else train_path  # where a bad key came from
    train_cfg = dataclass_from_dict(TrainConfig, {**raw, **overrides}, where)
    resume = engine.resume_path(args.resume, train_cfg.out_dir) if args.resume else None
    if resume:
        ck = engine.resume_state(resume)
        if not args.model:
            model_cfg = ModelConfig.from_dict(ck["model_config"], f"{resume}: model_config")
        if not args.train:
            known = {k: v for k, v in ck.get("train_config", {}).items() if k in TrainConfig.__dataclass_fields__}
            train_cfg = dataclass_from_dict(TrainConfig, {**known, **overrides}, f"{resume}: train_config")
    return model_cfg, train_cfg, resume


def main(argv=None):
    cli(build_parser().parse_args(argv))


def cli(args, engine=TorchEngine):
    """Load the configs named on the command line and train; user errors exit with code 2 and one line."""
    code = 0
    try:
        model_cfg, train_cfg, resume = load_configs(args, engine)
        train(model_cfg, train_cfg, resume=resume, stop_at=args.stop_at, overwrite=args.overwrite, engine=engine)
        if dist.is_initialized():
            dist.barrier()  # rank 0 may still be writing its checkpoint: leave together
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        code = 3
    except NanoError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
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
