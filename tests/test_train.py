import json
import os
import re
import subprocess
import sys

import pytest
import torch

from files import ConfigError
from hf import load_checkpoint
from model import ModelConfig
from train import TrainConfig, lr_at, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SENTENCES = ["the cat sat on the mat.", "a dog ran in the park.", "the old man fished in the river.",
             "birds sang over the water.", "she read a book by the fire.", "we walked home in the rain."]


def corpus_docs(n_docs=60, seed=0):
    """Documents of fixed sentences in random order: a small model can learn to finish each sentence."""
    import random
    rnd = random.Random(seed)
    return ["\n".join(" ".join(rnd.choice(SENTENCES) for _ in range(rnd.randint(2, 4)))
                      for _ in range(rnd.randint(3, 8))) for _ in range(n_docs)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from data import prepare_pretrain
    root = tmp_path_factory.mktemp("corpus")
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus_docs()), encoding="utf-8")
    out = root / "data"
    prepare_pretrain([str(src)], str(out), vocab_size=64, val_ratio=0.1, workers=1)
    return str(out)


def tiny_model(**kw):
    cfg = dict(block_size=32, vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, n_hidden=64)
    cfg.update(kw)
    return ModelConfig(**cfg)


def tiny_train(data_dir, out_dir, **kw):
    cfg = dict(data_dir=data_dir, out_dir=str(out_dir), batch_size=8, max_iters=40, learning_rate=3e-3,
               min_lr=3e-4, warmup_iters=5, eval_interval=20, eval_iters=4, log_interval=5,
               device="cpu", tensorboard=False)
    cfg.update(kw)
    return TrainConfig(**cfg)


def test_tiny_pretrain_loss_falls(data_dir, tmp_path):
    train(tiny_model(), tiny_train(data_dir, tmp_path, max_iters=80), quiet=True)
    log = (tmp_path / "train.log").exists()
    assert not log  # quiet: nothing written
    ck = load_checkpoint(str(tmp_path / "best.pt"))
    # a model that only knew token frequencies would score the unigram entropy of the data;
    # training must beat that clearly (the untrained model sits near ln(vocab), higher still)
    from data import load_tokens
    counts = torch.bincount(torch.from_numpy(load_tokens(data_dir, "train").astype("int64")), minlength=64)
    p = counts[counts > 0].double() / counts.sum()
    unigram = -(p * p.log()).sum().item()
    assert ck["val_loss"] < 0.6 * unigram < torch.log(torch.tensor(64.0)).item()
    assert ck["step"] == 80 and ck["tokenizer"]["type"] == "trie"
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_resume_continues_on_the_same_curve(data_dir, tmp_path):
    # dropout on and grad accumulation: resume must restore RNG, sampler, optimizer and step exactly
    mc = dict(dropout=0.1)
    straight = train(tiny_model(**mc), tiny_train(data_dir, tmp_path / "a", max_iters=24, grad_accum=2,
                                                  eval_interval=8, tensorboard=True), quiet=False)
    cfg_b = tiny_train(data_dir, tmp_path / "b", max_iters=24, grad_accum=2, eval_interval=8)
    train(tiny_model(**mc), cfg_b, stop_at=12, quiet=True)
    assert load_checkpoint(str(tmp_path / "b" / "last.pt"))["step"] == 12
    resumed = train(tiny_model(**mc), cfg_b, resume=str(tmp_path / "b" / "last.pt"), quiet=True)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    # the logged run also wrote TensorBoard events and a text log
    assert os.listdir(tmp_path / "a" / "tb")
    assert "eval step 24" in (tmp_path / "a" / "train.log").read_text()


def test_checkpoint_is_plain_and_weights_only(data_dir, tmp_path):
    train(tiny_model(), tiny_train(data_dir, tmp_path, max_iters=5, eval_interval=5), quiet=True)
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert set(ck) >= {"model", "model_config", "train_config", "tokenizer", "optimizer", "step", "rng"}
    json.dumps({k: ck[k] for k in ("model_config", "train_config", "tokenizer")})  # JSON-able


def test_lr_schedule():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert lr_at(0, cfg) < lr_at(5, cfg) < lr_at(9, cfg) <= 1.0
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)


def test_config_errors_name_the_problem(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="block_size 4096"):
        train(tiny_model(block_size=4096), tiny_train(data_dir, tmp_path), quiet=True)
    with pytest.raises(ConfigError, match="vocab_size 16 is smaller"):
        train(tiny_model(vocab_size=16), tiny_train(data_dir, tmp_path), quiet=True)
    with pytest.raises(ConfigError, match="grad_accum"):
        TrainConfig(grad_accum=0).validate()
    with pytest.raises(ConfigError, match="init_from"):
        TrainConfig(mode="sft").validate()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"max_iter": 10}))
    r = subprocess.run([sys.executable, "train.py", "-t", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "unknown key 'max_iter'" in r.stderr and "max_iters" in r.stderr
    bad.write_text("{not json")
    r = subprocess.run([sys.executable, "train.py", "-t", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "not valid JSON" in r.stderr
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ConfigError, match="garbage.pt is truncated or not a torch checkpoint"):
        load_checkpoint(str(garbage))


def test_cli_train_infer_and_plot(data_dir, tmp_path):
    model_json = tmp_path / "model.json"
    model_json.write_text(json.dumps(tiny_model().to_dict()))
    train_json = tmp_path / "train.json"
    train_json.write_text(json.dumps({"data_dir": data_dir, "out_dir": str(tmp_path / "run"), "max_iters": 30,
                                      "batch_size": 8, "eval_interval": 15, "eval_iters": 2, "device": "cpu",
                                      "learning_rate": 3e-3, "warmup_iters": 2}))
    r = subprocess.run([sys.executable, "train.py", "-m", str(model_json), "-t", str(train_json)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "eval step 30" in r.stdout
    r = subprocess.run([sys.executable, "infer.py", "-m", str(tmp_path / "run" / "best.pt"), "--prompt", "the old",
                        "-t", "0", "-n", "12", "--profile"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the old") and len(r.stdout) > len("the old") + 5
    assert "tokens/s" in r.stderr
    r = subprocess.run([sys.executable, "plot_loss.py", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    png = (tmp_path / "run" / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    r = subprocess.run([sys.executable, "infer.py", "-m", str(tmp_path / "nope.pt"), "--prompt", "x"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "checkpoint not found" in r.stderr


def test_data_on_device_gives_the_same_run(data_dir, tmp_path):
    # the GPU fast path (token files copied to the device, batches gathered there) runs on the CPU
    # too: it must draw exactly the batches the memmap path draws
    a = train(tiny_model(), tiny_train(data_dir, tmp_path / "a", max_iters=10, data_on_device=False), quiet=True)
    b = train(tiny_model(), tiny_train(data_dir, tmp_path / "b", max_iters=10, data_on_device=True,
                                       save_on_eval=False), quiet=True)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert (tmp_path / "b" / "last.pt").exists()  # save_on_eval off: still written at the end
    # a yes/no setting takes JSON booleans, "auto", and the strings older configs have; nothing else
    from files import dataclass_from_dict
    for given, meant in ((True, True), (False, False), ("true", True), ("false", False), ("auto", "auto")):
        assert dataclass_from_dict(TrainConfig, {"data_on_device": given}).data_on_device == meant
    for bad in ("yes", 1, None, [True]):
        with pytest.raises(ConfigError, match="data_on_device.* must"):
            dataclass_from_dict(TrainConfig, {"data_on_device": bad})


def test_eval_batch_size_scores_the_same_windows(data_dir, tmp_path, monkeypatch):
    # eval_batch_size changes how many validation windows go through one forward, never which: the
    # same val loss (up to float summation order) whether the 32 windows go as 4 x 8, 1 x 32 or 11 x 3
    import train as train_module
    forwards, eval_loss = [], train_module.eval_loss
    monkeypatch.setattr(train_module, "eval_loss", lambda model, data, n, batch_size, *a:
                        forwards.append((n, batch_size)) or eval_loss(model, data, n, batch_size, *a))
    runs = {}
    for size in (None, 32, 3):
        out = tmp_path / str(size)
        forwards.clear()
        model = train(tiny_model(), tiny_train(data_dir, out, max_iters=20, eval_batch_size=size), quiet=True)
        assert forwards and set(forwards) == {(32, size or 8)}  # 4 eval_iters x batch 8 windows, in these batches
        runs[size] = (load_checkpoint(str(out / "last.pt"))["val_loss"], model.state_dict())
    for size in (32, 3):
        assert runs[size][0] == pytest.approx(runs[None][0], rel=1e-5)
        for (name, x), (_, y) in zip(runs[size][1].items(), runs[None][1].items()):
            assert torch.equal(x, y), name  # evaluation draws nothing from the training's random streams
    for bad in (0, -8, 2 ** 20 + 1):
        with pytest.raises(ConfigError, match="eval_batch_size must be in"):
            TrainConfig(eval_batch_size=bad).validate()


def test_cuda_graph_is_refused_where_it_cannot_work(data_dir, tmp_path):
    # the CUDA-graph step is GPU-only (measured in docs/BENCHMARKS.md); here: its guard rails
    with pytest.raises(ConfigError, match="cuda_graph needs one CUDA device"):
        train(tiny_model(), tiny_train(data_dir, tmp_path, cuda_graph=True), quiet=True)
    from files import dataclass_from_dict
    with pytest.raises(ConfigError, match="cuda_graph does not support float16"):
        dataclass_from_dict(TrainConfig, {"cuda_graph": True, "dtype": "float16"})
    # the Triton loss kernel likewise (tests/test_speed_kernels.py holds the kernel itself); a yes/no setting
    with pytest.raises(ConfigError, match="loss_kernel needs a CUDA device with Triton"):
        train(tiny_model(), tiny_train(data_dir, tmp_path, loss_kernel=True), quiet=True)
    with pytest.raises(ConfigError, match="loss_kernel"):
        dataclass_from_dict(TrainConfig, {"loss_kernel": "yes"})
    # null (the default) picks it where it pays, the float8 head on CUDA: on the CPU that is off, and fp8 trains
    assert dataclass_from_dict(TrainConfig, {"loss_kernel": None}).loss_kernel is None
    assert dataclass_from_dict(TrainConfig, {"loss_kernel": False}).loss_kernel is False
    model = train(tiny_model(), tiny_train(data_dir, tmp_path, fp8="head", max_iters=2), quiet=True)
    assert type(model.head).__name__ == "FusedLossHead" and model.head.kernel is False


def test_set_lr_fills_a_tensor_learning_rate_in_place():
    # a captured CUDA graph reads the learning-rate tensor it was recorded with: set_lr must write
    # into that very tensor, and a plain number stays a plain number
    from train import set_lr
    p = torch.nn.Parameter(torch.zeros(2))
    lr = torch.tensor(1e-3)
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [], "weight_decay": 0.0}], lr=lr)
    set_lr(opt, 5e-4)
    assert all(g["lr"] is lr for g in opt.param_groups) and lr.item() == pytest.approx(5e-4)
    opt2 = torch.optim.AdamW([p], lr=1e-3)
    set_lr(opt2, 2e-4)
    assert opt2.param_groups[0]["lr"] == 2e-4


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only path: run on a CUDA machine")


@needs_cuda
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_step_follows_the_eager_curve(data_dir, tmp_path, compile):
    # the replayed graph must do exactly what the eager step does: same batches, same clipping, the
    # learning-rate schedule (a tensor filled before each replay) and grad accumulation
    curves = {}
    for graph in (False, True):
        stats = []
        cfg = tiny_train(data_dir, tmp_path / f"g{graph}", device="cuda", dtype="float32", max_iters=30,
                         log_interval=1, eval_interval=15, grad_accum=2, cuda_graph=graph, compile=compile)
        train(tiny_model(), cfg, quiet=True, stats=stats)
        curves[graph] = torch.tensor([s["loss"] for s in stats])
    assert curves[True][-1] < 0.7 * curves[True][0]
    torch.testing.assert_close(curves[True], curves[False], rtol=2e-3, atol=2e-3)


@needs_cuda
def test_cuda_graph_run_resumes_and_trains_with_dropout(data_dir, tmp_path):
    mc = dict(dropout=0.1)
    cfg = tiny_train(data_dir, tmp_path, device="cuda", dtype="bfloat16", max_iters=40, cuda_graph=True)
    train(tiny_model(**mc), cfg, stop_at=20, quiet=True)
    first = load_checkpoint(str(tmp_path / "last.pt"))
    assert first["step"] == 20
    train(tiny_model(**mc), cfg, resume=str(tmp_path / "last.pt"), quiet=True)
    ck = load_checkpoint(str(tmp_path / "last.pt"))
    assert ck["step"] == 40 and ck["val_loss"] < first["val_loss"]
    assert all(isinstance(g["lr"], float) or g["lr"].numel() == 1 for g in ck["optimizer"]["param_groups"])


def test_save_checkpoints_off_writes_nothing(data_dir, tmp_path):
    # bench.py measures throughput only: a 13B ZeRO-3 probe must not write hundreds of GB of shards
    train(tiny_model(), tiny_train(data_dir, tmp_path, max_iters=10, eval_interval=5, save_checkpoints=False),
          quiet=True)
    assert not list(tmp_path.glob("*.pt"))


def test_fp8_training_follows_the_full_precision_curve(data_dir, tmp_path, monkeypatch):
    # float8 products (train config fp8) are an approximation: the run must learn as well as the
    # float32 one (same batches, same init) within 5% of its validation loss; the settings reach speed.py
    import speed
    settings, real = [], speed.make_fast
    monkeypatch.setattr(speed, "make_fast", lambda model, *a, **kw: settings.append((a, kw)) or real(model, *a, **kw))
    curves, vals = {}, {}
    for mode in ("off", "all"):
        stats = []
        train(tiny_model(), tiny_train(data_dir, tmp_path / mode, max_iters=60, fp8=mode), quiet=True, stats=stats)
        curves[mode] = [s["loss"] for s in stats]
        vals[mode] = load_checkpoint(str(tmp_path / mode / "last.pt"))["val_loss"]
    assert [(a, kw["fast_accum"]) for a, kw in settings] == [(("off",), True), (("all",), True)]
    assert curves["all"] != curves["off"]  # the float8 products really ran
    assert curves["all"][-1] < 0.5 * curves["all"][0]
    assert abs(vals["all"] - vals["off"]) < 0.05 * vals["off"]
    with pytest.raises(ConfigError, match="fp8 must be one of"):
        tiny_train(data_dir, tmp_path, fp8="on").validate()
    import train_ds
    with pytest.raises(ConfigError, match="fp8 needs .* train.py or train_ddp.py"):  # not under DeepSpeed
        train(tiny_model(), tiny_train(data_dir, tmp_path / "ds", fp8="all"), quiet=True,
              engine=train_ds.deepspeed_engine({}))


def test_compile_tuning_passes_inductor_options_and_keeps_the_curve(data_dir, tmp_path, monkeypatch):
    # compile_tuning only changes how Inductor picks its kernels, never what they compute
    import speed
    seen, real_compile = [], torch.compile

    def spy(model, **kw):
        seen.append(kw.get("options"))
        return real_compile(model, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    curves = {}
    for tuning in (False, True):
        stats = []
        cfg = tiny_train(data_dir, tmp_path / str(tuning), max_iters=6, log_interval=1, eval_interval=6,
                         compile=True, compile_tuning=tuning)
        train(tiny_model(), cfg, quiet=True, stats=stats)
        curves[tuning] = torch.tensor([s["loss"] for s in stats])
    assert seen == [None, speed.COMPILE_TUNING]
    torch.testing.assert_close(curves[True], curves[False], rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="compile_tuning needs compile=true"):
        tiny_train(data_dir, tmp_path, compile_tuning=True).validate()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_an_edit_to_model_py_is_what_fp8_compiled_training_trains(data_dir, tmp_path, monkeypatch, device):
    # one forward everywhere: a researcher's edit to Block.forward (here: the feed-forward branch
    # multiplied by 0) is what train.py trains with float8 products and torch.compile too. With the
    # edit the feed-forward weights get no gradient and (no weight decay) end exactly where they
    # began; without it they move. On a GPU also with the CUDA-graph step (bench/bench_gpu.sh tests).
    import model as model_py
    if device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 products need compute capability 8.9+")

    def edited(self, x, rope, cache=None, pos=0):
        x = x + self.attn(self.attn_norm(x), rope, cache, pos)
        return x + 0.0 * self.ffn(self.ffn_norm(x))

    extra = dict(device="cuda", dtype="bfloat16", cuda_graph=True) if device == "cuda" else {}
    import train as train_module
    built, real_build = [], train_module.build_model

    def spy(*args):  # the weights a run starts from
        model, lora_base = real_build(*args)
        built.append({k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()})
        return model, lora_base

    monkeypatch.setattr(train_module, "build_model", spy)
    moved = {}
    # (an edit in model.py starts a new process; in this one compiled code is cached against
    # Transformer.forward's code, which the edit does not change: clear it when the edit comes in,
    # and again when it goes, or the tests after this one would train the edited model)
    try:
        for edit in (False, True):
            if edit:
                monkeypatch.setattr(model_py.Block, "forward", edited)
                torch._dynamo.reset()
            stats = []
            cfg = tiny_train(data_dir, tmp_path / str(edit), max_iters=12, log_interval=4, eval_interval=12,
                             fp8="all", compile=True, weight_decay=0.0, **extra)
            end = train(tiny_model(), cfg, quiet=True, stats=stats).state_dict()
            start = built[-1]
            moved[edit] = {k: (end[k].float().cpu() - start[k]).abs().max().item() for k in start if ".ffn." in k}
            assert stats[-1]["loss"] < stats[0]["loss"]  # it trained
    finally:
        torch._dynamo.reset()
    assert all(v > 1e-4 for v in moved[False].values()), moved[False]
    assert all(v == 0.0 for v in moved[True].values()), moved[True]


@needs_cuda
def test_fp8_blocks_run_cublaslt_without_a_workspace_and_still_learn(data_dir, tmp_path):
    # train() sets CUBLASLT_WORKSPACE_SIZE=0 for float8 blocks before the process's first cuBLASLt
    # product (torch reads it then): a fresh process, so that no earlier test's product came first
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 products need compute capability 8.9+")
    script = f"""
import os, sys
sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
os.environ.pop("CUBLASLT_WORKSPACE_SIZE", None)
from test_train import tiny_model, tiny_train
from train import train
stats = []
train(tiny_model(), tiny_train({data_dir!r}, {str(tmp_path)!r}, device="cuda", dtype="bfloat16", max_iters=60,
      cuda_graph=True, fp8="all", log_interval=5), quiet=True, stats=stats)
print("workspace", os.environ.get("CUBLASLT_WORKSPACE_SIZE"), stats[0]["loss"], stats[-1]["loss"])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    _, size, first, last = out.stdout.split()[-4:]
    assert size == "0" and float(last) < 0.6 * float(first)


@needs_cuda
def test_fp8_compiled_cuda_graph_run_follows_the_bf16_curve(data_dir, tmp_path):
    # the configuration bench.py measures: compiled, CUDA-graph step, bf16 autocast, float8 products
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 products need compute capability 8.9+")
    curves = {}
    for mode in ("off", "all"):
        stats = []
        cfg = tiny_train(data_dir, tmp_path / mode, device="cuda", dtype="bfloat16", max_iters=60, compile=True,
                         cuda_graph=True, fp8=mode, log_interval=5)
        train(tiny_model(), cfg, quiet=True, stats=stats)
        curves[mode] = torch.tensor([s["loss"] for s in stats])
    assert curves["all"][-1] < 0.5 * curves["all"][0]
    torch.testing.assert_close(curves["all"], curves["off"], rtol=0.05, atol=0.05)


def test_tokens_seen_counts_the_training_window(data_dir, tmp_path):
    # tokens per step is batch_size x grad_accum x the window trained on: seq_len where it is set
    # (shorter than the model's block_size), else block_size; counted once, for the log and checkpoints
    for seq_len, window in ((None, 32), (16, 16)):
        out = tmp_path / str(seq_len)
        stats = []
        train(tiny_model(), tiny_train(data_dir, out, max_iters=6, eval_interval=6, log_interval=3, grad_accum=2,
                                       seq_len=seq_len), quiet=True, stats=stats)
        ck = load_checkpoint(str(out / "last.pt"))
        assert ck["tokens_seen"] == 6 * 8 * 2 * window
        assert all(abs(s["tokens_per_sec"] * s["ms_per_step"] / 1000 - 8 * 2 * window) < 1e-6 * window for s in stats)


def test_the_fused_float8_head_is_refused_for_a_soft_capped_model(data_dir, tmp_path):
    # (issue #34) speed.FusedLossHead computes the loss from uncapped logits: fp8 head / all would
    # train another model than model.py's, so they are refused by name; fp8 blocks keeps model.py's head
    for fp8 in ("head", "all"):
        with pytest.raises(ConfigError, match=f"fp8 {fp8} computes the head and the loss in one step without the "
                                              "model's logit_softcap"):
            train(tiny_model(logit_softcap=10.0), tiny_train(data_dir, tmp_path, fp8=fp8, max_iters=2), quiet=True)
    model = train(tiny_model(logit_softcap=10.0), tiny_train(data_dir, tmp_path / "blocks", fp8="blocks", max_iters=2,
                                                             eval_interval=2), quiet=True)
    assert type(model.head).__name__ == "OutputHead" and model.head.softcap == 10.0


def test_target_val_loss_stops_at_the_first_eval_that_reaches_it(data_dir, tmp_path):
    # time-to-loss runs (config/shakespeare_char_train.json): stop at the first eval at or below the
    # target, save, and say when, counted from process start and from torch's import
    cfg = tiny_train(data_dir, tmp_path, max_iters=40, eval_interval=5, target_val_loss=3.2)
    train(tiny_model(), cfg, quiet=False)
    log = (tmp_path / "train.log").read_text()
    evals = [line for line in log.splitlines() if line.startswith("eval step")]
    losses = [float(line.split("val loss ")[1].split()[0]) for line in evals]
    assert len(losses) > 1 and losses[-1] <= 3.2 and all(v > 3.2 for v in losses[:-1])
    # (the first crossing, and no eval after it)
    step = int(evals[-1].split()[2])
    assert step < 40 and load_checkpoint(str(tmp_path / "last.pt"))["step"] == step
    reached = [line for line in log.splitlines() if line.startswith("reached target val loss 3.2")]
    assert len(reached) == 1 and f"at step {step}," in reached[0]
    total, after_import = (float(x) for x in re.findall(r"([\d.]+) s after", reached[0]))
    assert 0 < after_import <= total
    # bench/bench_recipe.py reads the line
    from test_bench import _bench_script
    assert _bench_script("bench_recipe").REACHED.search(log).groups() == (str(step), f"{total:.1f}", f"{after_import:.1f}")
