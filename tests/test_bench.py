import json

import bench
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
