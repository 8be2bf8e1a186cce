# Muon (muon.py) and the train-config keys around it (issue #34): the orthogonalisation against an SVD,
# the AdamW half against torch.optim.AdamW, which parameters go where (also after speed.py's swaps),
# grad accumulation, exact resume, the schedules, and bad settings refused by name.
import copy

import pytest
import torch

import muon
import speed
from files import ConfigError, dataclass_from_dict
from hf import load_checkpoint
from model import ModelConfig, Transformer
from test_train import data_dir, tiny_model, tiny_train  # noqa: F401  (data_dir: a fixture)
from train import TrainConfig, lr_at, make_optimizer, set_lr, train


def svd_polar(g):
    """U V^T of g's SVD: the orthogonal factor that Newton-Schulz approximates."""
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return u @ vh


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32), (3, 48, 20), (1, 7)])
def test_orthogonalise_is_the_polar_factor_of_an_svd(shape):
    torch.manual_seed(0)
    g = torch.randn(shape) * 1e-3  # the scale must not matter: gradients are small
    x = muon.orthogonalise(g)
    assert x.shape == g.shape and x.dtype == g.dtype
    x = x.double()
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    # the same singular vectors: U^T X V is diagonal ...
    inner = u.mT @ x @ vh.mT
    diagonal = torch.diagonal(inner, dim1=-2, dim2=-1)
    off = inner - torch.diag_embed(diagonal)
    assert off.abs().max() < 1e-4
    # ... with every singular value pushed near 1 (the quintic's band, modded-nanogpt: about 0.7-1.2), all but
    # the tiniest: five steps lift a singular value at most 3.4445^5 times (a square Gaussian's last is 1e-4
    # of the Frobenius norm), and none goes past the band
    relative = s / g.double().norm(dim=(-2, -1)).unsqueeze(-1)
    assert diagonal[relative > 2e-3].min() > 0.6 and diagonal.max() < 1.25 and diagonal.min() > 0
    cos = (x * svd_polar(g)).sum((-2, -1)) / (x.norm(dim=(-2, -1)) * svd_polar(g).norm(dim=(-2, -1)))
    assert cos.min() > 0.97


def test_orthogonalise_of_a_rank_one_matrix_and_of_zeros():
    a, b = torch.randn(40, 1), torch.randn(1, 24)
    x = muon.orthogonalise(a @ b)
    expected = (a / a.norm()) @ (b / b.norm())  # the polar factor of a rank-one matrix
    s = torch.linalg.svdvals(x)
    assert s[0] > 0.6 and s[1:].max() < 1e-3  # (float32 rounding, lifted like any small singular value)
    torch.testing.assert_close(x / s[0], expected, atol=1e-4, rtol=0)
    assert torch.equal(muon.orthogonalise(torch.zeros(8, 16)), torch.zeros(8, 16))  # no NaN from 0/0


def test_parameters_are_sorted_by_shape_and_role_not_module_type():
    cfg = ModelConfig(block_size=16, vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, n_hidden=48,
                      tie_embeddings=False, use_rope=False, bias=True)
    model = Transformer(cfg)
    hidden, rest = muon.split_parameters(model)
    hidden_names = {n for n, _ in hidden}
    expected = {f"layers.{i}.{m}.weight" for i in range(2)
                for m in ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "ffn.w1", "ffn.w2", "ffn.w3")}
    assert hidden_names == expected
    rest_names = {n for n, _ in rest}
    assert {"tok_embeddings.weight", "pos_embeddings.weight", "output.weight", "norm.weight"} <= rest_names
    assert all(p.dim() == 1 for n, p in rest if n.endswith(".bias"))
    # speed.py's Float8Linear keeps the very same Parameters: the optimizer's groups do not change
    opt = muon.Muon(model, 1e-3)
    before = [[id(p) for p in g["params"]] for g in opt.param_groups]
    speed.make_fast(model, "all")
    assert any(isinstance(m, speed.Float8Linear) for m in model.modules())
    assert [[id(p) for p in g["params"]] for g in muon.Muon(model, 1e-3).param_groups] == before
    assert [g["kind"] for g in opt.param_groups] == ["muon", "adamw", "adamw"]
    assert [g["weight_decay"] for g in muon.Muon(model, 1e-3, weight_decay=0.1).param_groups] == [0.1, 0.1, 0.0]


def test_the_adamw_half_is_torch_adamw():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(block_size=16, vocab_size=64, n_layer=1, n_embd=32, n_head=4, n_kv_head=2,
                                    n_hidden=48, tie_embeddings=False))
    reference = copy.deepcopy(model)
    opt = muon.Muon(model, 3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    _, rest = muon.split_parameters(reference)
    torch_adamw = torch.optim.AdamW([{"params": [p for _, p in rest if p.dim() >= 2], "weight_decay": 0.1},
                                     {"params": [p for _, p in rest if p.dim() < 2], "weight_decay": 0.0}],
                                    lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    for step in range(5):
        for name, p in model.named_parameters():  # the same gradients for both (the hidden matrices, which
            p.grad = torch.randn_like(p) * 10.0 ** -step  # differ, would give the rest different ones)
            dict(reference.named_parameters())[name].grad = p.grad.clone()
        set_lr(opt, 3e-3 * (step + 1) / 5)
        for g in torch_adamw.param_groups:
            g["lr"] = 3e-3 * (step + 1) / 5
        opt.step()
        torch_adamw.step()
    ours, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    for name, _ in rest:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-5, msg=name)


def test_a_first_muon_step_moves_each_matrix_along_its_gradients_polar_factor():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(block_size=16, vocab_size=64, n_layer=1, n_embd=32, n_head=4, n_kv_head=2,
                                    n_hidden=48))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = muon.Muon(model, 1e-3, muon_lr=0.02, weight_decay=0.0)
    x = torch.randint(64, (4, 16))
    model(x, x)[1].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for name, p in muon.split_parameters(model)[0]:
        step = (before[name] - p.detach()).double()
        rows, cols = p.shape
        scale = 0.02 * max(1, rows / cols) ** 0.5
        # in the gradient's singular basis the step is diagonal (its singular vectors are the gradient's),
        # with the lr (x the tall-matrix scale) x the quintic's band on the diagonal: all but the gradient's
        # tiniest directions, which five iterations cannot lift all the way (a first gradient is near low-rank)
        u, g, vh = torch.linalg.svd(grads[name].double(), full_matrices=False)
        inner = u.mT @ step @ vh.mT / scale
        diagonal = torch.diagonal(inner)
        assert (inner - torch.diag(diagonal)).abs().max() < 1e-3, name
        lifted = g / g.norm() > 2e-3
        assert lifted.sum() >= 4 and diagonal[lifted].min() > 0.6 and diagonal.max() < 1.25, name
        assert diagonal.min() >= -1e-3, name  # and never against the gradient


def run_weights(data_dir, out, model_cfg, **kw):  # noqa: F811
    return {k: v.clone() for k, v in train(model_cfg, tiny_train(data_dir, out, **kw), quiet=True).state_dict().items()}


def test_grad_accumulation_takes_the_step_of_the_whole_batch(data_dir, tmp_path):  # noqa: F811
    # 2 micro-batches of 4 draw the very windows of one batch of 8 (one generator, in order): the same
    # gradient, so the same orthogonalised step up to float rounding
    whole = run_weights(data_dir, tmp_path / "a", tiny_model(), optimizer="muon", max_iters=12, batch_size=8)
    parts = run_weights(data_dir, tmp_path / "b", tiny_model(), optimizer="muon", max_iters=12, batch_size=4,
                        grad_accum=2)
    for name in whole:
        torch.testing.assert_close(parts[name], whole[name], atol=2e-5, rtol=0, msg=name)


@pytest.mark.parametrize("recipe", [{}, dict(qk_norm=True, activation="relu2", zero_init=True, logit_softcap=15.0)])
def test_muon_with_wsd_resumes_bit_exactly_and_learns(data_dir, tmp_path, recipe):  # noqa: F811
    kw = dict(optimizer="muon", lr_schedule="wsd", max_iters=24, grad_accum=2, eval_interval=8)
    straight = run_weights(data_dir, tmp_path / "a", tiny_model(dropout=0.1, **recipe), **kw)
    cfg = tiny_train(data_dir, tmp_path / "b", **kw)
    train(tiny_model(dropout=0.1, **recipe), cfg, stop_at=12, quiet=True)
    ck = load_checkpoint(str(tmp_path / "b" / "last.pt"))
    assert ck["step"] == 12 and {g["kind"] for g in ck["optimizer"]["param_groups"]} == {"muon", "adamw"}
    assert all(s["updates"].item() == 12 for s in ck["optimizer"]["state"].values())  # the momentum warmup's clock
    resumed = train(tiny_model(dropout=0.1, **recipe), cfg, resume=str(tmp_path / "b" / "last.pt"), quiet=True)
    for name, w in resumed.state_dict().items():
        assert torch.equal(w, straight[name]), name
    assert load_checkpoint(str(tmp_path / "a" / "last.pt"))["val_loss"] < 0.7 * torch.log(torch.tensor(64.0)).item()


def test_muon_trains_at_least_as_far_as_adamw_on_the_tiny_corpus(data_dir, tmp_path):  # noqa: F811
    val = {}
    for opt in ("adamw", "muon"):
        train(tiny_model(), tiny_train(data_dir, tmp_path / opt, optimizer=opt, max_iters=60, eval_interval=60),
              quiet=True)
        val[opt] = load_checkpoint(str(tmp_path / opt / "last.pt"))["val_loss"]
    assert val["muon"] < val["adamw"] + 0.05, val


def test_wsd_holds_then_cools_down_linearly():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110, lr_schedule="wsd",
                      cooldown_frac=0.4)
    assert lr_at(0, cfg) < lr_at(9, cfg) < 1.0
    assert lr_at(10, cfg) == lr_at(40, cfg) == lr_at(66, cfg) == 1.0  # stable until 110 - 0.4 * 110 = 66
    assert lr_at(88, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(99, cfg) - lr_at(100, cfg) == pytest.approx(lr_at(70, cfg) - lr_at(71, cfg))  # a straight line
    cfg.cooldown_frac = 1.0  # all of it: a straight line from the end of the warmup
    assert lr_at(10, cfg) == 1.0 and lr_at(60, cfg) == pytest.approx(0.55)


def test_set_lr_keeps_each_groups_ratio_and_tensor():
    model = Transformer(tiny_model())
    opt = make_optimizer(model, TrainConfig(optimizer="muon", learning_rate=2e-3, muon_lr=0.05), "cpu")
    set_lr(opt, 1e-3)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.025), 1e-3, 1e-3]
    for g in opt.param_groups:  # cuda_graph: the captured tensors are filled in place
        g["lr"] = torch.tensor(0.0)
    tensors = [g["lr"] for g in opt.param_groups]
    set_lr(opt, 2e-3)
    assert [g["lr"] for g in opt.param_groups] == tensors and tensors[0].item() == pytest.approx(0.05)


@pytest.mark.parametrize("settings,message", [
    ({"optimizer": "sgd"}, "optimizer must be one of ('adamw', 'muon'), got 'sgd'"),
    ({"optimizer": "Muon"}, "optimizer must be one of"),
    ({"lr_schedule": "linear"}, "lr_schedule must be one of ('cosine', 'wsd'), got 'linear'"),
    ({"cooldown_frac": 0}, "cooldown_frac must be in (0, 1]"),
    ({"cooldown_frac": 1.5}, "cooldown_frac must be in (0, 1]"),
    ({"cooldown_frac": float("nan")}, "cooldown_frac must be a finite number"),
    ({"muon_lr": 0}, "muon_lr must be positive"),
    ({"muon_lr": -0.02}, "muon_lr must be positive"),
    ({"muon_lr": float("inf")}, "muon_lr must be a finite number"),
    ({"muon_momentum": 1.0}, "muon_momentum must be in [0, 1)"),
    ({"muon_momentum": -0.1}, "muon_momentum must be in [0, 1)"),
    ({"optimizer": 3}, "optimizer"),
    ({"mode": "lora", "init_from": "x.pt", "optimizer": "muon"}, "LoRA trains low-rank adapters: use optimizer adamw"),
])
def test_bad_optimizer_settings_are_refused_by_name(settings, message):
    with pytest.raises(ConfigError, match="train config") as e:
        dataclass_from_dict(TrainConfig, settings, "train config").validate()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_resume_refuses_another_optimizer_or_schedule(data_dir, tmp_path):  # noqa: F811
    cfg = tiny_train(data_dir, tmp_path, optimizer="muon", max_iters=20)
    train(tiny_model(), cfg, stop_at=5, quiet=True)
    for key, value in (("optimizer", "adamw"), ("muon_lr", 0.03), ("lr_schedule", "wsd")):
        other = tiny_train(data_dir, tmp_path, **{"optimizer": "muon", "max_iters": 20, key: value})
        with pytest.raises(ConfigError, match=f"{key} .* -> "):
            train(tiny_model(), other, resume=str(tmp_path / "last.pt"), quiet=True)


def test_a_run_checkpointed_before_the_recipe_keys_existed_resumes(data_dir, tmp_path):  # noqa: F811
    # a checkpoint written before issue #34 has no qk_norm, activation, zero_init or logit_softcap in its
    # model_config: it trained today's model, their defaults, and resumes as it did
    cfg = tiny_train(data_dir, tmp_path, max_iters=10)
    train(tiny_model(), cfg, stop_at=5, quiet=True)
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    for key in ("qk_norm", "activation", "zero_init", "logit_softcap"):
        del ck["model_config"][key]
    torch.save(ck, tmp_path / "last.pt")
    train(tiny_model(), cfg, resume=str(tmp_path / "last.pt"), quiet=True)
    assert load_checkpoint(str(tmp_path / "last.pt"))["step"] == 10
    with pytest.raises(ConfigError, match="model config differs from the checkpoint's in qk_norm"):
        train(tiny_model(qk_norm=True), cfg, resume=str(tmp_path / "last.pt"), quiet=True)


def test_resume_may_change_how_attention_is_computed(data_dir, tmp_path):  # noqa: F811
    # sdpa_kernel names a kernel, not a model (config/model_56m.json moved to "triton" on 2026-12-05): a run
    # resumes with another one, and any other model key still refuses
    cfg = tiny_train(data_dir, tmp_path, max_iters=10)
    train(tiny_model(), cfg, stop_at=5, quiet=True)
    train(tiny_model(sdpa_kernel="triton"), cfg, resume=str(tmp_path / "last.pt"), quiet=True)
    assert load_checkpoint(str(tmp_path / "last.pt"))["step"] == 10
    with pytest.raises(ConfigError, match="model config differs from the checkpoint.s in n_layer: "):
        train(tiny_model(sdpa_kernel="math", n_layer=3), cfg, resume=str(tmp_path / "last.pt"), quiet=True)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only path: run on a CUDA machine")


@needs_cuda
@pytest.mark.parametrize("compile", [False, True])
def test_muon_in_a_cuda_graph_follows_the_eager_curve_and_resumes(data_dir, tmp_path, compile):  # noqa: F811
    # the captured step reads the learning-rate tensors set_lr fills and Muon's on-device warmup clock
    curves = {}
    for graph in (False, True):
        stats = []
        cfg = tiny_train(data_dir, tmp_path / f"g{graph}", device="cuda", dtype="float32", max_iters=30, log_interval=1,
                         eval_interval=15, grad_accum=2, cuda_graph=graph, compile=compile, optimizer="muon",
                         lr_schedule="wsd")
        train(tiny_model(), cfg, quiet=True, stats=stats)
        curves[graph] = torch.tensor([s["loss"] for s in stats])
    assert curves[True][-1] < 0.7 * curves[True][0]
    torch.testing.assert_close(curves[True], curves[False], rtol=2e-3, atol=2e-3)
    cfg = tiny_train(data_dir, tmp_path / "resume", device="cuda", dtype="bfloat16", max_iters=30, cuda_graph=True,
                     compile=compile, optimizer="muon")
    train(tiny_model(), cfg, stop_at=15, quiet=True)
    train(tiny_model(), cfg, resume=str(tmp_path / "resume" / "last.pt"), quiet=True)
    assert load_checkpoint(str(tmp_path / "resume" / "last.pt"))["step"] == 30
