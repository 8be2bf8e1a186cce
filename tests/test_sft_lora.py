import json
import os
import subprocess
import sys

import pytest
import torch

from data import load_sft_rows, prepare_pretrain, prepare_sft, sft_encode
from files import ConfigError, check_adapter, load_adapter, load_json
from hf import load_checkpoint
from model import (LoRAConfig, ModelConfig, Transformer, add_lora, attach_lora, detach_lora, merge_lora,
                   model_from_checkpoint, set_lora_enabled)
from tokenizer import load_tokenizer
from data import SFTData, sft_targets
from train import TrainConfig, eval_loss, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANIMALS = ["cat", "dog", "bird", "fish", "cow", "pig", "owl", "fox"]
COLOURS = ["red", "blue", "green", "black", "white", "brown"]


def qa_pairs(n, seed):
    import random
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        a, c = rnd.choice(ANIMALS), rnd.choice(COLOURS)
        if rnd.random() < 0.5:
            out.append({"question": f"the {c} {a}. what animal?", "answer": a})
        else:
            out.append({"question": f"the {c} {a}. what colour?", "answer": c})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny pretrained base and SFT data with its tokenizer."""
    root = tmp_path_factory.mktemp("sft")
    import random
    rnd = random.Random(0)
    # sentences, and words on lines of their own, so that the vocabulary holds every word (with and
    # without its leading space) and the question marks of the SFT prompts
    docs = ["\n".join(f"the {rnd.choice(COLOURS)} {rnd.choice(ANIMALS)}. what?\n{rnd.choice(ANIMALS + COLOURS)}"
                      for _ in range(30)) for _ in range(40)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare_pretrain([str(root / "docs.jsonl")], str(root / "pre"), vocab_size=128, val_ratio=0.1, workers=1,
                     progress=False)
    mcfg = ModelConfig(block_size=32, vocab_size=128, n_layer=2, n_embd=48, n_head=4, n_kv_head=2, n_hidden=96)
    tcfg = TrainConfig(data_dir=str(root / "pre"), out_dir=str(root / "base"), batch_size=16, max_iters=200,
                       learning_rate=3e-3, warmup_iters=5, eval_interval=60, eval_iters=2, device="cpu",
                       tensorboard=False)
    train(mcfg, tcfg, quiet=True)
    pairs = qa_pairs(600, 1)
    with open(root / "qa.jsonl", "w") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")
        f.write("{broken json\n")
        f.write(json.dumps({"question": 1, "answer": "x"}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "the red cat. what animal?"},
                                         {"role": "assistant", "content": "cat"},
                                         {"role": "user", "content": "what colour?"},
                                         {"role": "assistant", "content": "red"}]}) + "\n")
    base = str(root / "base" / "best.pt")
    prepare_sft([str(root / "qa.jsonl")], str(root / "sft"), tokenizer=base, block_size=32, val_ratio=0.1)
    return root, base


def test_sft_mask_marks_exactly_answers_and_eos(setup, capsys):
    root, _ = setup
    tok = load_tokenizer(str(root / "sft" / "tokenizer.json"))
    ids, mask = sft_encode(tok, [{"role": "user", "content": "what?"}, {"role": "assistant", "content": "a cat"},
                                 {"role": "user", "content": "and?"}, {"role": "assistant", "content": "dog"}])
    assert ids[:2] == [tok.bos_id, tok.instruct_id]
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == tok.encode("a cat") + [tok.eos_id] + tok.encode("dog") + [tok.eos_id]
    rows, masks = load_sft_rows(str(root / "sft"), "train")
    for row, m in zip(rows[:50], masks[:50]):
        row, m = row.tolist(), m.tolist()
        # every trained token is an answer token or <|eos|>; padding and prompts never are
        for i, (t, k) in enumerate(zip(row, m)):
            if t == tok.pad_id:
                assert k == 0
            if t in (tok.instruct_id, tok.response_id, tok.bos_id):
                assert k == 0
        assert all(row[i - 1] == tok.response_id or m[i - 1] == 1 for i in range(1, len(row)) if m[i] and not m[i - 1])


def test_malformed_sft_lines_are_reported_and_skipped(setup, tmp_path, capsys):
    root, base = setup
    meta = prepare_sft([str(root / "qa.jsonl")], str(tmp_path / "s"), tokenizer=base, block_size=32, force=True)
    err = capsys.readouterr().err
    assert meta["skipped_lines"] == 2 and "qa.jsonl:601: invalid JSON" in err and "qa.jsonl:602" in err
    # 600 pairs + the multi-turn sample (longer than 32 tokens: dropped, and counted)
    assert meta["train_samples"] + meta["val_samples"] + meta["dropped_overlong"] == 601
    from data import DataError
    with pytest.raises(DataError, match="601 are longer than block_size 8"):  # counted, never silently lost
        prepare_sft([str(root / "qa.jsonl")], str(tmp_path / "t"), tokenizer=base, block_size=8, force=True)
    cut = prepare_sft([str(root / "qa.jsonl")], str(tmp_path / "u"), tokenizer=base, block_size=21,
                      overlong="truncate", force=True)
    assert cut["truncated"] > 0


def test_masked_targets_change_neither_loss_nor_gradients(setup):
    root, base = setup
    ck = load_checkpoint(base)
    model = model_from_checkpoint(ck).train()
    data = SFTData(str(root / "sft"), 32, 128)
    ids, mask = data.split["train"]
    x = torch.from_numpy(ids[:4].astype("int64"))
    m = torch.from_numpy(mask[:4].astype(bool))

    def loss_and_grads(next_tokens):
        model.zero_grad()
        _, loss = model(x[:, :-1], sft_targets(next_tokens, m[:, 1:]))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    nxt = x[:, 1:].clone()
    loss0, grads0 = loss_and_grads(nxt)
    other = nxt.clone()
    other[~m[:, 1:]] = (other[~m[:, 1:]] + 5) % 128  # change every prompt and padding target
    loss1, grads1 = loss_and_grads(other)
    assert torch.equal(loss0, loss1) and all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    answer = other.clone()
    pos = m[:, 1:].nonzero()[0]
    answer[pos[0], pos[1]] = (answer[pos[0], pos[1]] + 1) % 128  # change one answer target
    loss2, _ = loss_and_grads(answer)
    assert not torch.equal(loss0, loss2)


def test_lora_attach_merge_detach(setup):
    _, base = setup
    ck = load_checkpoint(base)
    model = model_from_checkpoint(ck).eval()
    x = torch.randint(0, 128, (2, 20))
    ref, _ = model(x)
    add_lora(model, LoRAConfig(rank=4, alpha=8, targets=["wq", "wk", "wv", "wo", "w1", "w2", "w3"]))
    fresh, _ = model(x)
    assert torch.equal(fresh, ref)  # B = 0: a fresh adapter is an identity
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    attached, _ = model(x)
    assert not torch.allclose(attached, ref, atol=1e-3)
    set_lora_enabled(model, False)
    assert torch.equal(model(x)[0], ref)
    set_lora_enabled(model, True)
    merge_lora(model)
    merged, _ = model(x)
    torch.testing.assert_close(merged, attached, atol=1e-5, rtol=1e-5)
    assert not any("lora" in n for n, _ in model.named_parameters())
    # detaching (instead of merging) restores the base exactly
    model2 = model_from_checkpoint(ck).eval()
    add_lora(model2, LoRAConfig(rank=2))
    detach_lora(model2)
    assert torch.equal(model2(x)[0], ref)


def test_default_lora_config_trains_at_most_ten_percent():
    model = Transformer(load_json(os.path.join(ROOT, "config/model.json"), ModelConfig))
    with open(os.path.join(ROOT, "config/lora.json")) as f:
        lora = TrainConfig(**{k: v for k, v in json.load(f).items() if not k.startswith("_")}).lora_config()
    base = model.num_params()
    add_lora(model, lora)
    trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert 0 < trainable <= 0.10 * base


LORA = {"rank": 4, "alpha": 8, "targets": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]}


def sft_config(root, base, mode, out, **kw):
    cfg = dict(mode=mode, init_from=base, data_dir=str(root / "sft"), out_dir=str(out), batch_size=16,
               max_iters=200, learning_rate=3e-3, warmup_iters=5, eval_interval=100, eval_iters=4,
               device="cpu", tensorboard=False)
    cfg.update(kw)
    return TrainConfig(**cfg)


def held_out_answer_loss(model, root):
    return eval_loss(model, SFTData(str(root / "sft"), 32, 128), 64, 16)


def test_sft_lowers_held_out_answer_loss(setup, tmp_path):
    root, base = setup
    before = held_out_answer_loss(model_from_checkpoint(load_checkpoint(base)), root)
    tuned = train(None, sft_config(root, base, "sft", tmp_path, dropout=0.1), quiet=True)
    after = held_out_answer_loss(tuned, root)
    assert after < 0.5 * before
    ck = load_checkpoint(str(tmp_path / "best.pt"))
    assert ck["step"] == 200 and ck["model_config"]["dropout"] == 0.1  # the run's dropout was applied


def test_lora_lowers_loss_saves_only_adapters_and_refuses_other_bases(setup, tmp_path):
    root, base = setup
    base_ck = load_checkpoint(base)
    before = held_out_answer_loss(model_from_checkpoint(base_ck), root)
    cfg = sft_config(root, base, "lora", tmp_path / "lora", lora=LORA, learning_rate=1e-2)
    tuned = train(None, cfg, quiet=True)
    assert held_out_answer_loss(tuned, root) < 0.7 * before
    # the base weights did not move
    for name, p in tuned.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p.detach(), base_ck["model"][name]), name
    adapter = torch.load(tmp_path / "lora" / "adapter.pt", weights_only=True)
    assert adapter["adapter"] and all(".lora_" in k for k in adapter["adapter"])
    tensors = [k for k, v in adapter.items() if isinstance(v, torch.Tensor)]
    assert tensors == []  # nothing but the adapter dict holds tensors
    # attaching it to its base reproduces the trained model; merging gives the same logits
    model = model_from_checkpoint(base_ck).eval()
    attach_lora(model, load_adapter(str(tmp_path / "lora" / "adapter.pt"), base_ck))
    x = torch.randint(0, 128, (1, 16))
    torch.testing.assert_close(model(x)[0], tuned.eval()(x)[0])
    # a different base (same shape, other weights) is refused
    other = {**base_ck, "model": {k: v + 0.01 for k, v in base_ck["model"].items()}}
    with pytest.raises(ConfigError, match="different base"):
        check_adapter(adapter, other)
    shaped = {**base_ck, "model_config": {**base_ck["model_config"], "n_layer": 3}}
    with pytest.raises(ConfigError, match="different model shape"):
        check_adapter(adapter, shaped)
    # resume of a LoRA run continues from the adapter checkpoint
    cfg2 = sft_config(root, base, "lora", tmp_path / "lora", lora=LORA, learning_rate=1e-2, max_iters=210)
    again = train(None, cfg2, resume=str(tmp_path / "lora" / "last.pt"), quiet=True)
    assert load_checkpoint_step(tmp_path / "lora" / "last.pt") == 210 and again is not None


def load_checkpoint_step(path):
    return torch.load(path, weights_only=True)["step"]


def test_infer_and_merge_cli_with_adapter(setup, tmp_path):
    root, base = setup
    cfg = sft_config(root, base, "lora", tmp_path / "lora", lora=LORA, learning_rate=1e-2)
    train(None, cfg, quiet=True)
    adapter = str(tmp_path / "lora" / "adapter.pt")
    q = "the green owl. what colour?"
    r = subprocess.run([sys.executable, "infer.py", "-m", base, "-l", adapter, "-i", "-t", "0", "-n", "8"],
                       cwd=ROOT, input=f"{q}\n/lora\n{q}\n/quit\n", capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "[adapter off]" in r.stdout
    on, off = r.stdout.split("[adapter off]")
    assert "green" in on  # the adapter learned the task
    merged = str(tmp_path / "merged.pt")
    r = subprocess.run([sys.executable, "merge_lora.py", base, adapter, merged], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r2 = subprocess.run([sys.executable, "infer.py", "-m", merged, "-i", "--prompt", q, "-t", "0", "-n", "8"],
                        cwd=ROOT, capture_output=True, text=True)
    assert r2.returncode == 0 and "green" in r2.stdout
    r3 = subprocess.run([sys.executable, "merge_lora.py", merged, adapter, str(tmp_path / "x.pt")], cwd=ROOT,
                        capture_output=True, text=True)
    assert r3.returncode == 2 and "different base" in r3.stderr
