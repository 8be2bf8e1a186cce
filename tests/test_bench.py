import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import bench
import speed
from model import ModelConfig, Transformer


def test_bench_measures_the_training_loop_and_profiles_it(tmp_path, capsys):
    # bench.py on a CPU: a tiny model through train.train (float8 products on), its figures consistent
    # with each other, the JSON line written, and the profile's kernel families adding up to the total
    cfg = dict(block_size=32, vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, n_hidden=64)
    model_file = tmp_path / "model.json"
    model_file.write_text(json.dumps(cfg))
    result = bench.main(["-m", str(model_file), "-b", "4", "--steps", "4", "--warmup", "2", "--log-interval", "2",
                         "--device", "cpu", "--profile", "3", "--trace", str(tmp_path / "trace.json"),
                         "--json", str(tmp_path / "out.jsonl"), "--train-set", "fp8=all"])
    assert result["tokens_per_sec"] > 0
    assert abs(result["tokens_per_sec"] * result["ms_per_step"] / 1000 - 4 * 32) < 1e-6 * 4 * 32
    n_params = sum(p.numel() for p in Transformer(ModelConfig(**cfg)).parameters())
    assert result["params_M"] == round(n_params / 1e6, 2) and result["block"] == 32 and result["batch"] == 4
    assert json.loads((tmp_path / "out.jsonl").read_text()) == json.loads(json.dumps(result))
    out = capsys.readouterr().out
    busy = float(out.split("busy time: ")[1].split(" ms")[0])
    span = float(out.split("CPU span: ")[1].split(" ms")[0])
    idle = float(out.split("CPU span: ")[1].split("ms per step, ")[1].split(" ms")[0])
    assert 0 <= idle < span and "operators per step" in out
    shares = [float(line.split("%")[0].split()[-1]) for line in out.splitlines() if "ms/step" in line and "%" in line
              and not line.strip()[0].isdigit()]
    assert busy > 0 and "matmul" in out and abs(sum(shares) - 100) < 0.5
    # --trace: the profiled steps' operators as a Chrome trace, the matrix products among them
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert any(e.get("ph") == "X" and "mm" in e.get("name", "") for e in events)


def test_busy_and_span_counts_overlaps_once():
    assert bench.busy_and_span([]) == (0, 0)
    assert bench.busy_and_span([(0, 10)]) == (10, 10)
    # nested and overlapping intervals (CPU operators nest; kernels on two streams overlap), then a gap
    assert bench.busy_and_span([(5, 8), (0, 10), (9, 12), (20, 25)]) == (17, 25)
    assert bench.busy_and_span([(3, 4), (1, 2)]) == (2, 3)


def _bench_script(name):
    """One of bench/'s scripts as a module (bench/ is not a package)."""
    path = pathlib.Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stack_trial_is_model_py_with_stacked_products(tmp_path, monkeypatch, capsys):
    # bench/bench_trials.py stack (measured -5.7% on the GPU, docs/BENCHMARKS.md): given the separate
    # weights concatenated, its one-product Attention and FeedForward compute what model.py's did (the
    # patch is on the classes, so the reference runs first), with GQA and qk_norm; bench.py trains through
    # it; a relu2 model and an unknown trial are refused
    trials = _bench_script("bench_trials")
    cfg = ModelConfig(block_size=16, vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, n_hidden=48,
                      qk_norm=True)
    torch.manual_seed(0)
    base = Transformer(cfg).eval()
    tokens = torch.randint(0, 64, (3, 16))
    with torch.no_grad():
        expected = base(tokens)[0]
    for owner, name, value in trials.TRIALS["stack"]:
        monkeypatch.setattr(owner, name, value)
    trial = Transformer(cfg).eval()
    names = {n for n, _ in trial.named_parameters()}
    assert "layers.0.attn.wqkv.weight" in names and "layers.0.ffn.w13.weight" in names
    assert not any(n.endswith((".wq.weight", ".wk.weight", ".wv.weight", ".w1.weight", ".w3.weight")) for n in names)
    assert sum(p.numel() for p in trial.parameters()) == sum(p.numel() for p in base.parameters())
    weights = dict(base.state_dict())
    for i in range(cfg.n_layer):
        a, f = f"layers.{i}.attn.", f"layers.{i}.ffn."
        weights[a + "wqkv.weight"] = torch.cat([weights.pop(a + w + ".weight") for w in ("wq", "wk", "wv")])
        weights[f + "w13.weight"] = torch.cat([weights.pop(f + w + ".weight") for w in ("w1", "w3")])
    trial.load_state_dict(weights)
    with torch.no_grad():
        assert torch.allclose(trial(tokens)[0], expected, atol=1e-5)
    model_file = tmp_path / "model.json"
    model_file.write_text(json.dumps(dict(block_size=32, vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                                          n_hidden=64)))
    result = bench.main(["-m", str(model_file), "-b", "4", "--steps", "3", "--warmup", "1", "--device", "cpu"])
    losses = [float(line.split("| loss ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()
              if line.startswith("run ")]
    assert result["tokens_per_sec"] > 0 and len(losses) == 1 and abs(losses[0] - math.log(64)) < 0.3
    with pytest.raises(SystemExit, match="relu2"):
        Transformer(ModelConfig(**{**cfg.__dict__, "activation": "relu2"}))
    with pytest.raises(SystemExit, match="usage"):
        trials.main(["stacked"])


def test_wgrad32_trial_trains_what_nn_linear_trains_and_trials_combine(monkeypatch):
    # bench/bench_trials.py wgrad32 (measured within noise on the GPU, docs/BENCHMARKS.md): the swapped
    # layers share model.py's Parameters and, under bf16 autocast, give the loss and gradients nn.Linear
    # gives, the weights' gradients in float32; it refuses float8; trials joined with "+" apply together,
    # the option trials on top of compile_tuning's options; an unknown one in a join is refused
    trials = _bench_script("bench_trials")
    cfg = ModelConfig(block_size=16, vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, n_hidden=48)
    torch.manual_seed(0)
    plain = Transformer(cfg)
    swapped = Transformer(cfg)
    swapped.load_state_dict(plain.state_dict())
    trials.apply("wgrad32+combo", monkeypatch.setattr)
    assert speed.make_fast(swapped) is swapped
    assert {type(m).__name__ for layer in swapped.layers for m in (layer.attn.wq, layer.attn.wo, layer.ffn.w2)} \
        == {"Float32GradLinear"}
    assert [n for n, _ in swapped.named_parameters()] == [n for n, _ in plain.named_parameters()]
    tokens = torch.randint(0, 64, (3, 17))
    grads = []
    for m in (plain, swapped):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(tokens[:, :-1], tokens[:, 1:])[1]
        loss.backward()
        grads.append((loss.item(), {n: p.grad for n, p in m.named_parameters()}))
    (loss_a, ga), (loss_b, gb) = grads
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert all(gb[n].dtype == torch.float32 for n in gb)
    for n in ga:
        assert torch.allclose(ga[n], gb[n], rtol=1e-3, atol=1e-6), n  # (on the CPU the same bf16 products)
    with pytest.raises(SystemExit, match="without fp8"):
        speed.make_fast(Transformer(cfg), "all")
    assert speed.compile_options(True) == {"combo_kernels": True, "coordinate_descent_tuning": True}
    assert speed.compile_options(False) == {"combo_kernels": True}
    trials.apply("ndtile", monkeypatch.setattr)
    assert speed.compile_options(True) == {"triton.prefer_nd_tiling": True, "coordinate_descent_tuning": True}
    with pytest.raises(SystemExit, match="usage"):
        trials.apply("wgrad32+nothing", monkeypatch.setattr)


def test_bpe_summary_compares_the_arms_at_adamws_median_best():
    # the 124M BPE runs of 2026-12-05 (docs/BENCHMARKS.md), cut to the steps around the bests
    adamw = [[(375, 3.317), (400, 3.321), (425, 3.303), (450, 3.332)],
             [(375, 3.313), (400, 3.310), (425, 3.285), (450, 3.304)],
             [(375, 3.327), (400, 3.325), (425, 3.303), (450, 3.331)]]
    muon = [[(225, 3.354), (250, 3.304), (275, 3.292), (300, 3.298)],
            [(225, 3.349), (250, 3.305), (275, 3.298), (300, 3.305)],
            [(225, 3.343), (250, 3.292), (275, 3.296), (300, 3.302)]]
    summarise = _bench_script("bench_recipe").bpe_summary
    a, m = summarise({"adamw": adamw, "muon": muon})
    assert a.startswith("124M BPE Bible, adamw: median 425 steps to val <= 3.303;") and "median best 3.303 at step 425" in a
    assert "muon: median 275 steps to val <= 3.303 (1.55x fewer than adamw)" in m
    assert "median best 3.292 at step 275" in m and "3.292@250/250" in m
    # a target that some runs of an arm never reach: said, not a step count or a ratio
    a, m = summarise({"adamw": adamw, "muon": muon}, target=3.30)
    assert "2 of 3 runs never reached val <= 3.300" in a and "median 275 steps to val <= 3.300" in m
    assert "fewer" not in m


def test_bench_reports_a_bad_setting_and_a_diverged_run_in_one_line(tmp_path):
    # a GPU run that went to NaN under compile_tuning printed a raw traceback (2026-12-05); now bench.py
    # ends such runs, and unknown settings, as train.py does: one "error:" line and exit 3 (diverged) or 2
    cfg = dict(block_size=16, vocab_size=32, n_layer=1, n_embd=16, n_head=2, n_kv_head=2, n_hidden=32)
    model_file = tmp_path / "model.json"
    model_file.write_text(json.dumps(cfg))
    root = os.path.dirname(os.path.abspath(bench.__file__))
    base = [sys.executable, "bench.py", "-m", str(model_file), "-b", "2", "--device", "cpu", "--steps", "10", "--warmup", "2"]
    for extra, code, words in ((["--train-set", "bogus=1"], 2, "unknown key 'bogus'"),
                               (["--train-set", "learning_rate=1e12", "grad_clip=0"], 3, "diverged")):
        r = subprocess.run(base + extra, capture_output=True, text=True, cwd=root)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == code and "Traceback" not in r.stderr, r.stderr
        assert lines[-1].startswith("error: ") and words in lines[-1]
