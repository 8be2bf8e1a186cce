"""DDP and DeepSpeed ZeRO-3 on 2 CPU processes (gloo): same curve as one process, resume, consolidation."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from files import ConfigError
from train import TrainConfig
from train_ds import batch_config as deepspeed_batch_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCES = ["the cat sat on the mat.", "a dog ran in the park.", "the old man fished in the river."]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from data import prepare_pretrain
    root = tmp_path_factory.mktemp("dist")
    rnd = random.Random(0)
    docs = [" ".join(rnd.choice(SENTENCES) for _ in range(20)) for _ in range(50)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare_pretrain([str(root / "docs.jsonl")], str(root / "data"), vocab_size=64, val_ratio=0.1, workers=1,
                     progress=False)
    (root / "model.json").write_text(json.dumps(dict(block_size=32, vocab_size=64, n_layer=2, n_embd=32, n_head=4,
                                                     n_kv_head=2, n_hidden=64)))
    (root / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True},
                                              "train_batch_size": "auto"}))
    return root


def train_json(root, name, **kw):
    cfg = dict(data_dir=str(root / "data"), out_dir=str(root / name), batch_size=4, grad_accum=4, max_iters=20,
               eval_interval=10, eval_iters=2, log_interval=1, device="cpu", tensorboard=False,
               learning_rate=3e-3, warmup_iters=2)
    cfg.update(kw)
    path = root / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600, **kw)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def losses(out):
    return [float(line.split("| loss ")[1].split()[0]) for line in out.splitlines() if line.startswith("step ")]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b, atol):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


@pytest.fixture(scope="module")
def single(setup):
    r = run([sys.executable, "train.py", "-m", str(setup / "model.json"), "-t", train_json(setup, "single")])
    return losses(r.stdout), weights(setup / "single" / "last.pt")


def test_ddp_follows_the_single_process_curve_and_resumes(setup, single):
    one_losses, one_weights = single
    r = run(torchrun("train_ddp.py", "-m", str(setup / "model.json"), "-t", train_json(setup, "ddp")))
    assert "world 2" in r.stdout and len(losses(r.stdout)) == 20
    assert losses(r.stdout) == pytest.approx(one_losses, abs=1e-4)
    assert_same_weights(weights(setup / "ddp" / "last.pt"), one_weights, atol=1e-5)
    # resume under DDP: 8 steps, stop, resume to 20 -> the same weights
    t = train_json(setup, "ddp_resume")
    run(torchrun("train_ddp.py", "-m", str(setup / "model.json"), "-t", t, "--stop-at", "8"))
    r = run(torchrun("train_ddp.py", "-m", str(setup / "model.json"), "-t", t, "--resume"))
    assert "at step 8" in r.stdout
    assert_same_weights(weights(setup / "ddp_resume" / "last.pt"), one_weights, atol=1e-5)


def test_zero3_trains_checkpoints_resumes_and_consolidates(setup, single):
    one_losses, one_weights = single
    out = setup / "live_logits.pt"
    t = train_json(setup, "zero3")
    # bf16 in ds.json is turned off on a CPU-only machine, so the run is float32 and comparable
    r = run(torchrun("tests/ds_live_logits.py", str(setup / "model.json"), t, str(setup / "ds.json"), str(out)))
    assert "float32" in r.stderr or "bf16" in r.stderr
    assert (setup / "zero3" / "ds" / "last").is_dir()  # DeepSpeed's own sharded checkpoint
    consolidated = weights(setup / "zero3" / "last.pt")
    assert_same_weights(consolidated, one_weights, atol=1e-5)  # same curve as one process
    # the consolidated checkpoint gives the live engine's logits in infer.py's loader
    from hf import load_checkpoint
    from model import model_from_checkpoint
    model = model_from_checkpoint(load_checkpoint(str(setup / "zero3" / "last.pt"))).eval()
    with torch.no_grad():
        logits, _ = model(torch.arange(1, 17).view(1, 16) % 64)
    torch.testing.assert_close(logits, torch.load(out, weights_only=True), atol=1e-5, rtol=0)
    r = run([sys.executable, "infer.py", "-m", str(setup / "zero3" / "last.pt"), "--prompt", "the", "-t", "0", "-n", "5"])
    assert r.stdout.startswith("the")
    # resume from the shards: stop at 10, resume to 20, equal to the straight run
    t2 = train_json(setup, "zero3_resume")
    cmd = torchrun("train_ds.py", "--deepspeed", "--deepspeed_config", str(setup / "ds.json"),
                   "-m", str(setup / "model.json"), "-t", t2)
    run(cmd + ["--stop-at", "10"])
    # a changed setting is refused, naming it, and leaves the shards as they were
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = subprocess.run(cmd + ["--resume", "--set", "learning_rate=0.5"], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=600)
    assert bad.returncode != 0 and "learning_rate 0.003 -> 0.5" in bad.stderr, bad.stderr[-2000:]
    # a plain --resume of the shards' folder continues with the run's own configs (ds/nano.json)
    r = run(torchrun("train_ds.py", "--deepspeed", "--deepspeed_config", str(setup / "ds.json"),
                     "--resume", str(setup / "zero3_resume")))
    assert "resume from" in r.stdout and "at step 10" in r.stdout
    assert_same_weights(weights(setup / "zero3_resume" / "last.pt"), consolidated, atol=0)
    # the conversion command writes the same plain checkpoint
    run([sys.executable, "train_ds.py", "--consolidate", str(setup / "zero3_resume"), "-o", str(setup / "c.pt")])
    assert_same_weights(weights(setup / "c.pt"), consolidated, atol=0)


def test_bad_deepspeed_batch_fields_fail_clearly(setup):
    cfg = TrainConfig(batch_size=4, grad_accum=4)
    ok = deepspeed_batch_config({"train_batch_size": "auto"}, cfg, 2)
    assert (ok["train_micro_batch_size_per_gpu"], ok["gradient_accumulation_steps"], ok["train_batch_size"]) == (4, 2, 16)
    with pytest.raises(ConfigError, match=r"train_batch_size \(10\) must equal .* \(4\) x .* \(2\) x world size \(2\)"):
        deepspeed_batch_config({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4,
                                "gradient_accumulation_steps": 2}, cfg, 2)
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu is 8, but the train config"):
        deepspeed_batch_config({"train_micro_batch_size_per_gpu": 8}, cfg, 2)
    bad = setup / "bad_ds.json"
    bad.write_text(json.dumps({"train_batch_size": 7, "zero_optimization": {"stage": 3}}))
    r = subprocess.run([sys.executable, "train_ds.py", "--deepspeed_config", str(bad), "-m", str(setup / "model.json"),
                        "-t", train_json(setup, "bad")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "ds_config: train_batch_size is 7" in r.stderr


def test_ddp_muon_takes_the_single_process_step(setup):
    # (issue #34) every rank orthogonalises the all-reduced gradient itself: the run is the one-process run
    one = run([sys.executable, "train.py", "-m", str(setup / "model.json"), "-t",
               train_json(setup, "muon_single", optimizer="muon", lr_schedule="wsd")])
    r = run(torchrun("train_ddp.py", "-m", str(setup / "model.json"), "-t",
                     train_json(setup, "muon_ddp", optimizer="muon", lr_schedule="wsd")))
    assert "world 2" in r.stdout and len(losses(r.stdout)) == 20
    assert losses(r.stdout) == pytest.approx(losses(one.stdout), abs=1e-4)
    assert_same_weights(weights(setup / "muon_ddp" / "last.pt"), weights(setup / "muon_single" / "last.pt"), atol=1e-5)


def test_zero3_refuses_muon_in_one_line(setup):
    r = subprocess.run([sys.executable, "train_ds.py", "--deepspeed_config", str(setup / "ds.json"), "-m",
                        str(setup / "model.json"), "-t", train_json(setup, "muon_ds", optimizer="muon")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "error: optimizer muon orthogonalises whole matrices, which ZeRO-3 splits across ranks" in r.stderr
