"""What a newcomer following the README is told: a run folder where a checkpoint is expected, a
typo in --set, a model vocabulary larger than the data's, a prompt longer than the context in C."""
import json
import os
import subprocess
import sys

import pytest

from locked_make import make

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SENTENCES = ["the cat sat on the mat.", "a dog ran in the park.", "the old man fished in the river."]


def run(cmd, ok=True, **kw):
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300, **kw)
    if ok:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


def model_json(root, name, **kw):
    cfg = dict(block_size=32, vocab_size=64, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, n_hidden=64)
    cfg.update(kw)
    path = root / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def train_json(root, name, **kw):
    cfg = dict(data_dir=str(root / "data"), out_dir=str(root / name), batch_size=4, max_iters=6, eval_interval=3,
               eval_iters=1, log_interval=1, device="cpu", tensorboard=False, warmup_iters=1)
    cfg.update(kw)
    path = root / f"{name}_train.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from data import prepare_pretrain
    root = tmp_path_factory.mktemp("hints")
    docs = [" ".join(SENTENCES[(i + j) % 3] for j in range(12)) for i in range(30)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = prepare_pretrain([str(root / "docs.jsonl")], str(root / "data"), vocab_size=64, val_ratio=0.1, workers=1,
                            progress=False)
    assert meta["vocab_size"] <= 64
    run([sys.executable, "train.py", "-m", model_json(root, "model"), "-t", train_json(root, "run")])
    return root


def test_infer_takes_a_run_folder_as_its_best_checkpoint(root):
    args = ["--prompt", "the cat", "-t", "0", "-n", "8"]
    want = run([sys.executable, "infer.py", "-m", str(root / "run" / "best.pt"), *args])
    got = run([sys.executable, "infer.py", "-m", str(root / "run"), *args])
    assert got.stdout == want.stdout and f"[{root / 'run'} is a training run: using its best.pt]" in got.stderr
    # a folder that is neither a run nor a model directory is still named as such
    (root / "empty").mkdir(exist_ok=True)
    bad = run([sys.executable, "infer.py", "-m", str(root / "empty"), *args], ok=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "config.json" in bad.stderr


def test_resume_takes_a_run_folder(root):
    t = train_json(root, "stopped")
    run([sys.executable, "train.py", "-m", model_json(root, "model"), "-t", t, "--stop-at", "3"])
    r = run([sys.executable, "train.py", "--resume", str(root / "stopped")])
    assert "resume from " + str(root / "stopped" / "last.pt") + " at step 3" in r.stdout
    import torch
    a = torch.load(root / "stopped" / "last.pt", weights_only=True)["model"]
    b = torch.load(root / "run" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same weights as the run never stopped


def test_a_set_typo_names_set_and_a_file_typo_names_the_file(root):
    t = train_json(root, "typo")
    r = run([sys.executable, "train.py", "-t", t, "--set", "max_iter=5", "device=cpu"], ok=False)
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: --set max_iter=5 device=cpu: unknown key 'max_iter' (did you mean "
                                "'max_iters'?)")
    bad = root / "typo_in_file.json"
    bad.write_text(json.dumps({**json.loads(open(t).read()), "lerning_rate": 0.1}))
    r = run([sys.executable, "train.py", "-t", str(bad), "--set", "max_iters=5"], ok=False)
    assert r.returncode == 2 and "unknown key 'lerning_rate' (did you mean 'learning_rate'?)" in r.stderr
    assert r.stderr.startswith(f"error: {bad}")


@pytest.mark.parametrize("vocab,warned", [(1024, True), (192, True), (128, False), (64, False)])
def test_a_model_vocabulary_far_larger_than_the_datas_is_warned_about(root, vocab, warned):
    from data import load_meta
    used = load_meta(str(root / "data"))["vocab_size"]
    r = run([sys.executable, "train.py", "-m", model_json(root, f"v{vocab}", vocab_size=vocab),
             "-t", train_json(root, f"v{vocab}", max_iters=1, eval_interval=1)])
    warning = (f"warning: the model's vocab_size is {vocab:,} but {root / 'data'}'s tokenizer has {used:,} tokens: "
               f"{vocab - used:,} embedding rows will never be used")
    assert (warning in r.stderr) == warned, r.stderr


def test_the_c_engine_says_when_it_cuts_a_long_prompt(root, tmp_path):
    r = make("-C", os.path.join(ROOT, "infer_c"), "infer")
    assert r.returncode == 0, r.stderr
    model = str(tmp_path / "m.bin")
    run([sys.executable, "export.py", model, "--checkpoint", str(root / "run" / "best.pt")])
    from hf import load_checkpoint
    from infer import prompt_ids
    from tokenizer import tokenizer_from_dict
    tok = tokenizer_from_dict(load_checkpoint(str(root / "run" / "best.pt"))["tokenizer"])
    engine = os.path.join(ROOT, "infer_c", "infer")
    for text, instruct in (("the cat sat on the mat. " * 8, False), ("the old man fished in the river. " * 6, True)):
        n = len(prompt_ids(tok, text, instruct))
        assert n > 32
        r = run([engine, model, "-i" if instruct else "-g", text, "-n", "2", "-t", "0"])
        assert f"[prompt is {n} tokens; only the last 32 fit the context]" in r.stderr
        py = run([sys.executable, "infer.py", "-m", str(root / "run" / "best.pt"), "--prompt", text, "-n", "2",
                  "-t", "0", *(["-i"] if instruct else [])])
        assert f"[prompt is {n} tokens; only the last 31 fit the context]" in py.stderr  # (one place for the reply)
    short = run([engine, model, "-g", "the cat", "-n", "2", "-t", "0"])
    assert "[prompt is" not in short.stderr
