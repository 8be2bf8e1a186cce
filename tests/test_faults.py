# Faults and bad input in training (issue #22): real signals at random moments, resume checks,
# non-finite values, a full disk, runs that would replace another run, damaged checkpoints.
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from files import ConfigError, load_torch_file
from test_train import data_dir, tiny_model, tiny_train  # noqa: F401  (data_dir: a fixture)
from train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def configs(tmp_path, data_dir, out, **train_kw):
    """-m and -t files of a tiny run into `out` (CPU, dropout on: the RNG state matters on resume)."""
    model_json, train_json = tmp_path / "model.json", tmp_path / f"train_{out.name}.json"
    model_json.write_text(json.dumps(tiny_model(dropout=0.1).to_dict()))
    cfg = {"data_dir": data_dir, "out_dir": str(out), "max_iters": 60, "batch_size": 8, "eval_interval": 7,
           "eval_iters": 2, "save_interval": 5, "log_interval": 1, "device": "cpu", "tensorboard": False,
           "learning_rate": 3e-3, "warmup_iters": 2, **train_kw}
    train_json.write_text(json.dumps(cfg))
    return ["-m", str(model_json), "-t", str(train_json)]


def run_train(args, **kw):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, env=ENV,
                          timeout=600, **kw)


def weights(path):
    return load_torch_file(str(path))["model"]


def test_signals_at_random_moments_resume_bit_exactly(data_dir, tmp_path):
    # SIGINT (Ctrl-C) or SIGTERM at a random moment of a real run, then --resume: the final weights
    # equal those of a run never interrupted, bit for bit (the stop lands on a step boundary)
    signals_resume_bit_exactly(data_dir, tmp_path, [signal.SIGINT, signal.SIGTERM, signal.SIGINT, signal.SIGTERM])


def test_muon_with_wsd_resumes_bit_exactly_through_signals(data_dir, tmp_path):
    # (issue #34) Muon's momentum buffers and warmup clock and the WSD schedule come back exactly too
    signals_resume_bit_exactly(data_dir, tmp_path, [signal.SIGINT, signal.SIGTERM], optimizer="muon",
                               lr_schedule="wsd", grad_accum=2)


def signals_resume_bit_exactly(data_dir, tmp_path, signals, **train_kw):
    straight = tmp_path / "straight"
    r = run_train(configs(tmp_path, data_dir, straight, **train_kw))
    assert r.returncode == 0, r.stderr
    reference = weights(straight / "last.pt")
    rnd = random.Random(os.getpid())
    for i, sig in enumerate(signals):
        out = tmp_path / f"run{i}"
        p = subprocess.Popen([sys.executable, "train.py", *configs(tmp_path, data_dir, out, **train_kw)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        # the moment is chosen by the run's own progress, not by a clock (a fast machine finishes 60 steps
        # in under a second): once step `after` is logged, the signal lands wherever the run then is, in
        # a step, an evaluation or a checkpoint save, at least 8 steps before its end
        after = rnd.randint(1, 52)
        for line in p.stdout:
            if line.startswith(f"step {after}/"):
                break
        time.sleep(rnd.uniform(0, 0.02))
        p.send_signal(sig)
        rest, err = p.communicate(timeout=600)
        assert p.returncode == 128 + sig, err
        assert f"{signal.Signals(sig).name} at step" in rest, rest
        assert not list(out.glob("*.tmp"))
        assert load_torch_file(str(out / "last.pt"))["step"] < 60
        r = run_train(["--resume", str(out / "last.pt")])  # the run's own configs, from the checkpoint
        assert r.returncode == 0, r.stderr
        assert "to step 60" in r.stdout
        got = weights(out / "last.pt")
        for name, w in reference.items():
            assert torch.equal(got[name], w), (i, signal.Signals(sig).name, after, name)


def test_resume_refuses_a_run_it_does_not_continue(data_dir, tmp_path):
    out = tmp_path / "run"
    args = configs(tmp_path, data_dir, out, max_iters=40)
    r = run_train(args + ["--stop-at", "10"])
    assert r.returncode == 0, r.stderr
    r = run_train(args + ["--resume", "--set", "batch_size=16", "learning_rate=0.01"])
    assert r.returncode == 2 and "batch_size 8 -> 16" in r.stderr and "learning_rate" in r.stderr
    assert "Keys that may change on resume: max_iters" in r.stderr and "Traceback" not in r.stderr
    # another dataset (another tokenizer) under data_dir
    from data import prepare_pretrain
    other = tmp_path / "other"
    src = tmp_path / "other.txt"
    src.write_text("completely different words here.\n" * 300, encoding="utf-8")
    prepare_pretrain([str(src)], str(other), vocab_size=40, val_ratio=0.0, val_tail=0.1, workers=1)
    r = run_train(args + ["--resume", "--set", f"data_dir={other}"])
    assert r.returncode == 2 and "holds other data than the run was trained on" in r.stderr, r.stderr
    # a plain --resume continues the run found with its own configs (here: max_iters 40, not the default)
    r = run_train(["--resume", str(out / "last.pt"), "--set", "max_iters=20"])  # a safe key may change
    assert r.returncode == 0, r.stderr
    assert "at step 10, to step 20" in r.stdout and load_torch_file(str(out / "last.pt"))["step"] == 20


@pytest.mark.parametrize("setting,message", [
    ("learning_rate=Infinity", "learning_rate must be a finite number"),
    ("weight_decay=NaN", "weight_decay must be a finite number"),
    ("beta1=NaN", "beta1 must be a finite number"),
    ("beta2=2", "beta2 must be in [0, 1)"),
    ("grad_clip=-1", "grad_clip must be >= 0"),
    ("grad_clip=NaN", "grad_clip must be a finite number"),
    ("learning_rate=0", "learning_rate > 0"),
])
def test_non_finite_and_out_of_range_settings_are_refused(data_dir, tmp_path, setting, message):
    r = run_train(configs(tmp_path, data_dir, tmp_path / "run") + ["--set", setting])
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


def test_ctrl_c_while_train_py_starts_is_quiet(data_dir, tmp_path):
    # a SIGINT while torch and the rest load (the first second or two) exits 130 without a traceback
    for delay in (0.3, 0.8, 1.5):
        p = subprocess.Popen([sys.executable, "train.py", *configs(tmp_path, data_dir, tmp_path / "run")], cwd=ROOT,
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, (delay, err[-2000:])
        assert p.returncode in (130, 128 + signal.SIGINT), (delay, p.returncode, err[-500:])
        if (tmp_path / "run").exists():  # (a signal after the loop began stops as a signal does: saved)
            subprocess.run(["rm", "-rf", str(tmp_path / "run")], check=True)


def test_a_config_nested_past_the_parser_is_one_line(data_dir, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    for args in (["-t", str(deep)], ["-m", str(deep)]):
        r = run_train(args + ["--set", f"out_dir={tmp_path / 'run'}"])
        assert r.returncode == 2 and "nests too deeply" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_train(configs(tmp_path, data_dir, tmp_path / "run") + ["--set", "lora=" + "[" * 50_000 + "]" * 50_000])
    assert r.returncode == 2 and "key 'lora'" in r.stderr and "Traceback" not in r.stderr, r.stderr[-500:]


@pytest.mark.parametrize("setting,message", [
    ("device=gpu0", "device 'gpu0' is not a device name"),
    ("device=tpu", "device 'tpu' is not a device name"),
    ("seed=1180591620717411303424", "seed must be in [0, 2^63)"),
    ("seed=-1", "seed must be in [0, 2^63)"),
    ("batch_size=10000000", "batch_size and grad_accum must be at most"),
    ("max_iter=5", "error: --set max_iter=5: unknown key 'max_iter' (did you mean 'max_iters'?)"),
] + ([("device=cuda", "this machine has no CUDA GPU")] if not torch.cuda.is_available() else []))
def test_hostile_settings_get_one_line_before_anything_is_allocated(data_dir, tmp_path, setting, message):
    r = run_train(configs(tmp_path, data_dir, tmp_path / "run") + ["--set", setting])
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run" / "last.pt").exists()


def test_model_config_sizes_and_non_finite_values_are_refused(tmp_path, data_dir):
    for key, value, message in [("rope_theta", float("nan"), "rope_theta must be a finite number"),
                                ("norm_eps", float("nan"), "norm_eps must be a finite number"),
                                ("n_embd", 2_000_000, "parameters"),  # (beyond this machine's memory)
                                ("n_layer", 1_000_000_000, "far beyond any machine")]:
        cfg = tiny_model().to_dict()
        cfg.update({key: value} if key != "n_embd" else {"n_embd": value, "head_dim": None})
        path = tmp_path / "bad_model.json"
        train_json = configs(tmp_path, data_dir, tmp_path / "run")[3]
        path.write_text(json.dumps(cfg))
        r = run_train(["-m", str(path), "-t", train_json])
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (key, r.stderr)
    # sizes under the sanity bound but over this machine's memory: refused before allocating
    from train import Env, check_memory
    huge = tiny_model(n_embd=65536, n_head=64, n_kv_head=64, n_hidden=65536, n_layer=64)
    cpu = Env(0, 0, 1, "cpu", "float32")
    with pytest.raises(ConfigError, match="need at least .* GiB to train .*; this machine has"):
        check_memory(huge, tiny_train(data_dir, tmp_path), cpu)
    # weights that fit in memory but a training state (4x: gradients, AdamW's moments) that does not
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    per_layer = tiny_model(n_embd=1024, n_head=16, n_kv_head=16, n_hidden=4096, n_layer=2).num_params() - \
        tiny_model(n_embd=1024, n_head=16, n_kv_head=16, n_hidden=4096, n_layer=1).num_params()
    n_layer = int(ram / 8 / per_layer) + 1  # float32 weights: about half the RAM
    fits_alone = tiny_model(n_embd=1024, n_head=16, n_kv_head=16, n_hidden=4096, n_layer=n_layer)
    assert 4 * fits_alone.num_params() < ram < 16 * fits_alone.num_params()
    with pytest.raises(ConfigError, match="need at least"):
        check_memory(fits_alone, tiny_train(data_dir, tmp_path), cpu)
    check_memory(tiny_model(), tiny_train(data_dir, tmp_path), cpu)  # and a small one passes


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny_model(), tiny_train(data_dir, out, max_iters=10, eval_interval=5), quiet=True)
    good = weights(out / "last.pt")
    import train as train_module
    real = train_module.TorchEngine.clip_and_update

    def poisoned(engine):  # from step 13 on, the gradients blow up
        if engine.optimizer.state and next(iter(engine.optimizer.state.values()))["step"] >= 12:
            for p in engine.params:
                p.grad.fill_(float("nan"))
        return real(engine)

    monkeypatch.setattr(train_module.TorchEngine, "clip_and_update", poisoned)
    with pytest.raises(train_module.Diverged, match="step 15: .*grad norm nan.*stops without saving"):
        train(tiny_model(), tiny_train(data_dir, out, max_iters=20, eval_interval=5), resume=str(out / "last.pt"),
              quiet=True)
    after = weights(out / "last.pt")
    assert all(torch.equal(after[k], v) for k, v in good.items())


def test_a_fresh_run_does_not_replace_another(data_dir, tmp_path):
    out = tmp_path / "run"
    args = configs(tmp_path, data_dir, out, max_iters=10, save_interval=0)
    assert run_train(args).returncode == 0
    before = (out / "last.pt").read_bytes()
    r = run_train(args)
    assert r.returncode == 2 and "already holds a run (best.pt, last.pt, train.log)" in r.stderr, r.stderr
    assert "--resume" in r.stderr and "--overwrite" in r.stderr and (out / "last.pt").read_bytes() == before
    r = run_train(args + ["--overwrite"])
    assert r.returncode == 0, r.stderr
    assert (out / "train.log").read_text().count("fresh start") == 1  # the old run's log went with it


def test_unwritable_out_dir_is_one_line(data_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = run_train(configs(tmp_path, data_dir, blocker / "run"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"cannot create out_dir {blocker / 'run'}: not a directory" in r.stderr, r.stderr


@pytest.fixture
def small_disk(tmp_path):
    """mount(size): a real file system of `size` bytes (a tmpfs; needs root: CI runs as root)."""
    mounted = []

    def mount(size):
        mnt = tmp_path / "disk"
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            if os.environ.get("CI"):
                pytest.fail(f"cannot mount a tmpfs under CI: {r.stderr.strip()}")
            pytest.skip(f"mounting a tmpfs needs root: {r.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_full_disk_keeps_the_previous_checkpoint(data_dir, tmp_path, small_disk):
    # a disk with room for the first save (last.pt + best.pt) and half a checkpoint more: a later
    # save runs out of space while it writes
    probe = tmp_path / "probe"
    assert run_train(configs(tmp_path, data_dir, probe, max_iters=10, eval_interval=10, save_interval=0)).returncode == 0
    size = (probe / "last.pt").stat().st_size
    out = small_disk(int(2.5 * size) // 4096 * 4096 + 8192) / "run"
    r = run_train(configs(tmp_path, data_dir, out, max_iters=60, eval_interval=10, save_interval=0))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"cannot write {out}/" in r.stderr and "no space left on device" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not list(out.glob("*.tmp"))  # the partial file is gone
    ck = load_torch_file(str(out / "last.pt"))  # the previous checkpoint is whole
    assert ck["step"] >= 10 and ck["step"] % 10 == 0


def test_a_full_disk_under_train_log_is_one_line(data_dir, tmp_path, small_disk):
    # the log, not a checkpoint, is what runs out of room (checkpoints off): one line, no traceback
    out = small_disk(8192) / "run"
    r = run_train(configs(tmp_path, data_dir, out, max_iters=400, eval_interval=1000, log_interval=1,
                          save_checkpoints=False))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip() == f"error: cannot write {out}/train.log: no space left on device", r.stderr


def test_damaged_checkpoints_get_clear_messages(tmp_path):
    path = tmp_path / "ck.pt"
    torch.save({"model": {"w": torch.zeros(1000)}, "model_config": {}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="is truncated or not a torch checkpoint"):
        load_torch_file(str(path))

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Evil()}, path)
    with pytest.raises(ConfigError, match="unpickling them could run any code") as e:
        load_torch_file(str(path))
    assert "weights_only=False" not in str(e.value)


def test_data_py_on_a_full_disk_and_export_of_a_bad_model_config(tmp_path, small_disk):
    src = tmp_path / "doc.txt"
    src.write_text("the quick brown fox jumps over the lazy dog. " * 40000, encoding="utf-8")
    out = small_disk(256 * 1024) / "data"
    r = subprocess.run([sys.executable, "data.py", "--input", str(src), "--out", str(out), "--workers", "1"],
                       cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "no space left on device" in r.stderr and "cannot write" in r.stderr
    import export
    ck = {"model": {}, "model_config": ["not", "a", "dict"], "tokenizer": {"type": "trie", "tokens": ["a"]}}
    with pytest.raises(export.ExportError, match="model_config: expected a JSON object, got list"):
        export.load_checkpoint(ck)
