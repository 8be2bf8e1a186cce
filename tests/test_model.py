import json
import math

import pytest
import torch
import torch.nn.functional as F

from files import ConfigError, dataclass_from_dict
from model import Decoder, ModelConfig, Transformer, apply_rope, rope_tables, sample_next


def tiny(**kw):
    base = dict(block_size=32, vocab_size=61, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, n_hidden=48)
    base.update(kw)
    return ModelConfig(**base)


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(tiny(**kw)).eval()


@pytest.mark.parametrize("use_rope", [True, False])
@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_kv_cache_matches_full_forward(use_rope, n_kv_head):
    m = make(use_rope=use_rope, n_kv_head=n_kv_head)
    idx = torch.randint(0, 61, (2, 25))
    full, _ = m(idx)
    cache = m.make_cache(batch_size=2)
    pieces, pos = [], 0
    for size in (7, 1, 5, 1, 1, 10):  # chunked prefill, then single steps, then another chunk
        out, _ = m(idx[:, pos:pos + size], cache=cache, pos=pos)
        pieces.append(out)
        pos += size
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    # the cache is compact: n_kv_head heads, not n_head
    assert cache[0][0].shape == (2, n_kv_head, 32, 8)


@pytest.mark.parametrize("use_rope", [True, False])
@pytest.mark.parametrize("n_kv_head", [1, 2])
@pytest.mark.parametrize("T", [1, 3])
def test_rows_at_their_own_positions_decode_as_each_row_alone(use_rope, n_kv_head, T):
    """serve.py's batched decoding: rows at different positions in one forward (pos a [B] tensor)
    give each row's logits and cache as that row decoded alone with an int pos."""
    m = make(use_rope=use_rope, n_kv_head=n_kv_head)
    lengths = [5, 1, 17, 9]  # each row's prompt length = the position of its next tokens
    prompts = [torch.randint(0, 61, (1, n)) for n in lengths]
    steps = torch.randint(0, 61, (len(lengths), T))
    shared = m.make_cache(batch_size=len(lengths))
    for k, v in shared:  # stale keys past each row's length (a finished request's) must not be seen
        k.normal_(), v.normal_()
    alone = []
    for r, prompt in enumerate(prompts):
        own = m.make_cache()
        m(prompt, cache=own, pos=0)
        m(prompt, cache=[(k[r:r + 1], v[r:r + 1]) for k, v in shared], pos=0)  # prefill into row r
        alone.append((m(steps[r:r + 1], cache=own, pos=lengths[r])[0], own))
    batched, _ = m(steps, cache=shared, pos=torch.tensor(lengths))
    for r, (logits, own) in enumerate(alone):
        torch.testing.assert_close(batched[r:r + 1], logits, atol=1e-5, rtol=1e-5)
        end = lengths[r] + T
        for (k, v), (k1, v1) in zip(shared, own):
            torch.testing.assert_close(k[r:r + 1, :, :end], k1[:, :, :end], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(v[r:r + 1, :, :end], v1[:, :, :end], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="exceeds block_size"):  # a row past the context is refused
        m(steps, cache=shared, pos=torch.tensor([5, 1, 32 - T + 1, 9]))


def reference_attention(q, k, v, causal):
    """Plain multi-head attention, written out."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    if causal:
        T = q.size(-2)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_gqa_equals_multi_head_attention_with_shared_kv(n_kv_head):
    m = make(n_kv_head=n_kv_head)
    attn = m.layers[0].attn
    x = torch.randn(2, 9, 32)
    B, T, H, D = 2, 9, 4, 8
    q = attn.wq(x).view(B, T, H, D)
    k = attn.wk(x).view(B, T, n_kv_head, D)
    v = attn.wv(x).view(B, T, n_kv_head, D).transpose(1, 2)
    cos, sin = m.rope_cos[:T], m.rope_sin[:T]
    q, k = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2)
    # each KV head serves H / n_kv_head consecutive query heads
    k, v = k.repeat_interleave(H // n_kv_head, 1), v.repeat_interleave(H // n_kv_head, 1)
    y = reference_attention(q, k, v, causal=True).transpose(1, 2).reshape(B, T, H * D)
    expected = attn.wo(y)
    got = attn(x, (cos, sin))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_causal_future_tokens_do_not_change_past_logits():
    m = make()
    a = torch.randint(0, 61, (1, 20))
    b = a.clone()
    b[0, 12:] = (b[0, 12:] + 7) % 61
    la, _ = m(a)
    lb, _ = m(b)
    torch.testing.assert_close(la[:, :12], lb[:, :12])
    assert not torch.allclose(la[:, 12:], lb[:, 12:])


def test_bidirectional_sees_the_future_and_one_pass_is_argmax():
    m = make(is_causal=False)
    a = torch.randint(0, 61, (1, 20))
    b = a.clone()
    b[0, 15] = (b[0, 15] + 1) % 61
    la, _ = m(a)
    lb, _ = m(b)
    assert not torch.allclose(la[:, :15], lb[:, :15])
    assert torch.equal(m.one_pass(a), la.argmax(-1))
    with pytest.raises(ValueError):
        m.generate([1, 2, 3])


def test_rope_rotates_adjacent_pairs_and_depends_on_relative_position():
    cos, sin = rope_tables(8, 64, 10000.0)
    x = torch.zeros(1, 2, 3, 8)  # [B, T, H, D]
    x[..., 0] = 1.0  # first pair = (1, 0): rotated by angle t * theta^0 = t, in every head
    out = apply_rope(x, cos[3:5], sin[3:5])
    for h in range(3):
        torch.testing.assert_close(out[0, 0, h, :2], torch.tensor([math.cos(3), math.sin(3)]))
        torch.testing.assert_close(out[0, 1, h, :2], torch.tensor([math.cos(4), math.sin(4)]))
    # <R(m) q, R(n) k> depends on m - n only
    q, k = torch.randn(8), torch.randn(8)

    def rot(v, p):
        return apply_rope(v.view(1, 1, 1, 8), cos[p:p + 1], sin[p:p + 1]).view(8)

    d1 = rot(q, 10) @ rot(k, 4)
    d2 = rot(q, 30) @ rot(k, 24)
    d3 = rot(q, 30) @ rot(k, 25)
    torch.testing.assert_close(d1, d2, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(d1, d3, atol=1e-4)


def test_sdpa_kernel_switch_is_harmless_on_cpu():
    idx = torch.randint(0, 61, (1, 16))
    ref, _ = make(sdpa_kernel="auto")(idx)
    for kernel in ("flash", "mem_efficient", "math", "cudnn", "triton"):  # (triton: speed.py's swap, in training)
        out, _ = make(sdpa_kernel=kernel)(idx)
        torch.testing.assert_close(out, ref)


def test_loss_ignores_minus_one_targets_and_scaled_init():
    m = make()
    x = torch.randint(0, 61, (2, 10))
    y = torch.randint(0, 61, (2, 10))
    y2 = y.clone()
    y[:, :4] = -1
    y2[:, :4] = -1
    _, l1 = m(x, y)
    logits, _ = m(x)
    expected = F.cross_entropy(logits[:, 4:].reshape(-1, 61), y[:, 4:].reshape(-1))
    torch.testing.assert_close(l1, expected)
    big = make(n_layer=8)
    std_wo = big.layers[0].attn.wo.weight.std().item()
    std_wq = big.layers[0].attn.wq.weight.std().item()
    assert std_wo < 0.5 * std_wq  # residual projections scaled by 1/sqrt(2 n_layer)


def test_generate_greedy_matches_argmax_and_stops_at_eos():
    m = make()
    prompt = [5, 9, 11]
    out = m.generate(prompt, max_new_tokens=6, temperature=0)
    ids = list(prompt)
    for _ in range(6):  # greedy by hand, without the cache
        logits, _ = m(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    assert out == ids[3:]
    streamed = []
    m.generate(prompt, max_new_tokens=6, temperature=0, callback=lambda t: streamed.append(t))
    assert streamed == out
    # declaring a greedy token to be <|eos|> stops before its first occurrence
    eos = out[-1]
    assert m.generate(prompt, max_new_tokens=6, temperature=0, eos_id=eos) == out[:out.index(eos)]
    # the callback can stop generation
    assert len(m.generate(prompt, max_new_tokens=6, temperature=0, callback=lambda t: True)) == 1
    # never beyond the context
    assert len(m.generate(list(range(30)), max_new_tokens=50, temperature=0)) == 3


def sharp(seed=0):
    """A model whose next token depends on the context: at init's scale a random model predicts from the
    last token alone, and would not notice a wrong or missing cache."""
    m = make(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" not in name:
                p.mul_(5)
    return m


def test_generate_gives_the_tokens_of_the_plain_int_position_loop():
    """generate() runs on the shared Decoder; its tokens, greedy or sampled with a seed, are those of
    the plain loop over the cache at int positions (the arithmetic the C engine's tests check)."""
    m = sharp()

    def plain(prompt, n, seed, **kw):  # the loop generate() ran before the Decoder
        ids, out, gen = list(prompt), [], torch.Generator().manual_seed(seed)
        cache = m.make_cache(1, min(32, len(ids) + n))
        logits, _ = m(torch.tensor([ids]), cache=cache, pos=0, last_only=True)
        for pos in range(len(ids), len(ids) + n):
            nxt = sample_next(logits[0, -1], previous_ids=ids, generator=gen, **kw)
            ids.append(nxt)
            out.append(nxt)
            if pos >= cache[0][0].size(2):
                break
            logits, _ = m(torch.tensor([[nxt]]), cache=cache, pos=pos, last_only=True)
        return out

    for prompt, n in (([5, 9, 11], 12), ([7], 20), (list(range(25)), 20)):  # the last one fills the context
        for seed, kw in ((0, dict(temperature=0)), (1, dict(temperature=1.0, top_p=0.9)),
                         (2, dict(temperature=0.8, top_k=20, repetition_penalty=1.3))):
            got = m.generate(prompt, max_new_tokens=n, generator=torch.Generator().manual_seed(seed), **kw)
            assert got == plain(prompt, n, seed, **kw)
    assert len(got) == 32 - 25 + 1


def test_decoder_rows_at_their_own_positions_decode_as_each_row_alone():
    """serve.py's use of the shared Decoder: requests join (each prompt prefilled into its own row), step
    together each at its own position, and leave (the last row moves into the freed one); every
    request's greedy tokens are those of decoding it alone with generate()."""
    m = sharp()
    torch.manual_seed(1)
    prompts = [torch.randint(0, 61, (n,)).tolist() for n in (5, 1, 12, 3, 8, 2)]
    wants = [9, 4, 7, 10, 1, 6]  # new tokens per request: rows leave at different steps
    alone = [m.generate(p, max_new_tokens=n, temperature=0) for p, n in zip(prompts, wants)]
    decoder = Decoder(m, rows=3, max_len=32)
    seqs, rows, waiting, own_positions = [list(p) for p in prompts], [], list(range(len(prompts))), 0

    def take(r, logits):  # greedy; the row leaves once it has all its tokens, as serve.py frees it
        j = rows[r]
        seqs[j].append(int(logits.argmax()))
        if len(seqs[j]) - len(prompts[j]) == wants[j]:
            last = len(rows) - 1
            if r != last:
                decoder.move(last, r, len(seqs[rows[last]]))
                rows[r] = rows[last]
            rows.pop()

    while waiting or rows:
        while waiting and len(rows) < 3:
            rows.append(waiting.pop(0))
            take(len(rows) - 1, decoder.prefill([prompts[rows[-1]]], len(rows) - 1)[0])
        if rows:
            pos = [len(seqs[j]) - 1 for j in rows]
            own_positions += len(set(pos)) > 1
            logits = decoder.step([seqs[j][-1] for j in rows], pos)
            assert logits.shape == (len(rows), 61)
            for r in reversed(range(len(rows))):
                take(r, logits[r])
    assert own_positions > 5  # most steps ran rows at different positions (the [B] pos path)
    assert [s[len(p):] for s, p in zip(seqs, prompts)] == alone


def test_sampling_semantics():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    assert sample_next(logits, temperature=0) == 0
    g = torch.Generator().manual_seed(0)
    # top-k: only the k most likely are ever drawn
    draws = {sample_next(logits, 1.0, top_k=2, generator=g) for _ in range(300)}
    assert draws == {0, 1}
    assert {sample_next(logits, 5.0, top_k=1, generator=g) for _ in range(50)} == {0}
    # top-p: probs = softmax -> [0.61, 0.22, 0.14, 0.03, 0.004]; p=0.7 keeps the first two
    draws = {sample_next(logits, 1.0, top_p=0.7, generator=g) for _ in range(500)}
    assert draws == {0, 1}
    draws = {sample_next(logits, 1.0, top_p=0.5, generator=g) for _ in range(100)}
    assert draws == {0}  # the most likely token is always kept
    # repetition penalty: positive logits are divided, negative multiplied -> both less likely
    assert sample_next(logits, 0, repetition_penalty=3.0, previous_ids=[0]) == 1  # 2/3 < 1
    neg = torch.tensor([-1.0, -1.2, -5.0])
    assert sample_next(neg, 0) == 0
    assert sample_next(neg, 0, repetition_penalty=1.5, previous_ids=[0]) == 1  # -1.5 < -1.2
    # temperature: a high temperature flattens the distribution
    g = torch.Generator().manual_seed(1)
    hot = [sample_next(logits, 100.0, generator=g) for _ in range(2000)]
    assert hot.count(4) > 200
    # the draws follow the softmax of the nucleus, renormalised (20,000 draws: 4 standard deviations
    # of a frequency are under 0.014)
    logits = torch.tensor([-0.5, 1.5, 0.2, 1.0, -2.0, 0.7])
    probs = torch.softmax(logits / 0.8, dim=-1)
    desc, order = torch.sort(probs, descending=True)
    nucleus = order[(torch.cumsum(desc, 0) - desc) < 0.9]  # tokens 1, 3, 5, 2
    want = torch.zeros(6)
    want[nucleus] = probs[nucleus] / probs[nucleus].sum()
    draws = torch.tensor([sample_next(logits, 0.8, top_p=0.9, generator=g) for _ in range(20000)])
    got = torch.bincount(draws, minlength=6) / 20000
    assert torch.all((got - want).abs() < 0.014), (got, want)


def test_config_round_trip_and_validation():
    cfg = tiny(use_rope=False, dropout=0.1)
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ConfigError, match="n_layers"):
        ModelConfig.from_dict({"n_layers": 3})
    with pytest.raises(ConfigError, match="did you mean 'n_layer'"):
        ModelConfig.from_dict({"n_layers": 3})
    with pytest.raises(ConfigError, match="'n_embd' must be int"):
        ModelConfig.from_dict({"n_embd": "256"})
    with pytest.raises(ConfigError, match="n_head"):
        ModelConfig.from_dict({"n_embd": 100, "n_head": 8, "n_kv_head": 4})
    with pytest.raises(ConfigError, match="n_kv_head"):
        ModelConfig.from_dict({"n_head": 8, "n_kv_head": 3})
    with pytest.raises(ConfigError, match="sdpa_kernel"):
        ModelConfig.from_dict({"sdpa_kernel": "fast"})
    with pytest.raises(ConfigError, match="expected a JSON object"):
        dataclass_from_dict(ModelConfig, [1, 2])
    assert ModelConfig.from_dict({"_comment": "ignored", "n_layer": 2}).n_layer == 2


def test_param_count_and_flops():
    m = make()
    assert m.num_params() == sum(p.numel() for p in m.parameters())
    c = m.cfg
    assert m.flops_per_token() == 6 * m.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size
    assert 0 < m.estimate_mfu(1000.0, 1e12) < 1


def test_activation_checkpointing_gives_the_same_gradients():
    # recomputed layers must reproduce the stored ones exactly, dropout masks included
    cfg = tiny(dropout=0.1)
    idx = torch.randint(0, 61, (2, 32), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = Transformer(cfg).train()
        model.checkpoint_layers = checkpointing
        torch.manual_seed(5)
        _, loss = model(idx, idx.roll(-1, 1))
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------
# The recipe options (issue #34, docs/RECIPES.md): each against the formula it names, and the model's
# own invariants (KV cache, parameter count) with the options on

RECIPE = dict(qk_norm=True, activation="relu2", zero_init=True, logit_softcap=5.0)


def test_recipe_defaults_are_todays_model():
    torch.manual_seed(0)
    today = Transformer(tiny())
    torch.manual_seed(0)
    explicit = Transformer(tiny(qk_norm=False, activation="swiglu", zero_init=False, logit_softcap=None))
    assert tiny().recipe() == {} and today.state_dict().keys() == explicit.state_dict().keys()
    for k, v in today.state_dict().items():
        assert torch.equal(v, explicit.state_dict()[k]), k
    assert tiny(**RECIPE).recipe() == {"qk_norm": True, "activation": "relu2", "logit_softcap": 5.0}  # not zero_init


def test_relu2_is_relu_squared_at_swiglus_cost():
    m = make(activation="relu2")
    ffn = m.layers[0].ffn
    assert ffn.w3 is None and ffn.w1.weight.shape == (72, 32) and ffn.w2.weight.shape == (32, 72)  # 1.5 x 48
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(ffn(x), (torch.clamp(x @ ffn.w1.weight.T, min=0) ** 2) @ ffn.w2.weight.T)
    for kw in ({}, {"bias": True}, {"qk_norm": True}):
        relu2, swiglu = tiny(activation="relu2", **kw), tiny(**kw)
        assert Transformer(relu2).num_params() == relu2.num_params()
        if not kw.get("bias"):  # (biases: SwiGLU's w1 and w3 have one each, ReLU^2's wider w1 one)
            assert relu2.num_params() == swiglu.num_params()
    assert Transformer(tiny(activation="relu2")).flops_per_token() == Transformer(tiny()).flops_per_token()


def test_qk_norm_puts_each_heads_q_and_k_at_unit_rms_before_rope():
    m = make(qk_norm=True)
    attn = m.layers[0].attn
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 2.0)
        attn.k_norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(2, 7, 32)
    B, T, H, KV, D = 2, 7, 4, 2, 8

    def unit_rms(t, w):
        return t / t.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * w

    q = unit_rms((x @ attn.wq.weight.T).view(B, T, H, D), attn.q_norm.weight)
    k = unit_rms((x @ attn.wk.weight.T).view(B, T, KV, D), attn.k_norm.weight)
    v = (x @ attn.wv.weight.T).view(B, T, KV, D)
    cos, sin = m.rope_cos[:T], m.rope_sin[:T]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    y = reference_attention(q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2),
                            v.repeat_interleave(2, 2).transpose(1, 2), causal=True)
    expected = y.transpose(1, 2).reshape(B, T, 32) @ attn.wo.weight.T
    torch.testing.assert_close(attn(x, (cos, sin)), expected, atol=1e-5, rtol=1e-5)
    # the gains are parameters (1-D: AdamW's in muon.py), in the checkpoint under their own names
    assert {"layers.0.attn.q_norm.weight", "layers.0.attn.k_norm.weight"} <= set(m.state_dict())
    assert m.num_params() == tiny(qk_norm=True).num_params() == tiny().num_params() + 2 * 2 * 8


def test_logit_softcap_is_cap_tanh_and_bounds_the_loss_input():
    plain, capped = make(seed=3), make(seed=3, logit_softcap=2.0)
    with torch.no_grad():
        for m in (plain, capped):
            m.tok_embeddings.weight.mul_(50)  # logits far past the cap
    idx = torch.randint(0, 61, (2, 9))
    logits, _ = plain(idx)
    got, loss = capped(idx, idx)
    torch.testing.assert_close(got, 2.0 * torch.tanh(logits / 2.0), atol=1e-5, rtol=1e-5)
    assert logits.abs().max() > 20 and got.abs().max() <= 2.0  # (float32's tanh reaches 1 exactly)
    torch.testing.assert_close(loss, F.cross_entropy(got.view(-1, 61), idx.view(-1)))


def test_zero_init_starts_every_block_as_the_identity():
    m = make(zero_init=True)
    for layer in m.layers:
        assert not layer.attn.wo.weight.any() and not layer.ffn.w2.weight.any()
        assert layer.attn.wq.weight.std() > 0.01  # the rest as before
    x = torch.randn(2, 6, 32)
    rope = (m.rope_cos[:6], m.rope_sin[:6])
    torch.testing.assert_close(m.layers[0](x, rope), x)


@pytest.mark.parametrize("option", [dict(qk_norm=True), dict(activation="relu2"), dict(logit_softcap=3.0), RECIPE])
def test_kv_cache_and_generation_with_the_recipe_options(option):
    m = make(**option)
    with torch.no_grad():  # zero_init's zero projections would make this test trivial
        for layer in m.layers:
            layer.attn.wo.weight.normal_(0, 0.1)
            layer.ffn.w2.weight.normal_(0, 0.1)
    idx = torch.randint(0, 61, (2, 20))
    full, _ = m(idx)
    cache = m.make_cache(batch_size=2)
    pieces, pos = [], 0
    for size in (6, 1, 1, 12):
        out, _ = m(idx[:, pos:pos + size], cache=cache, pos=pos)
        pieces.append(out)
        pos += size
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    out = m.generate([3, 4, 5], max_new_tokens=6, temperature=0)
    ids = [3, 4, 5]
    for _ in range(6):
        ids.append(int(m(torch.tensor([ids]))[0][0, -1].argmax()))
    assert out == ids[3:]


@pytest.mark.parametrize("kw,message", [
    (dict(activation="gelu"), "activation must be one of ('swiglu', 'relu2'), got 'gelu'"),
    (dict(activation="ReLU2"), "activation must be one of"),
    (dict(activation="relu2", n_hidden=47), "n_hidden must be even, got 47"),
    (dict(logit_softcap=0.0), "logit_softcap must be positive"),
    (dict(logit_softcap=-30), "logit_softcap must be positive"),
    (dict(logit_softcap=float("inf")), "logit_softcap must be a finite number"),
    (dict(qk_norm="yes"), "qk_norm"),
    (dict(zero_init=1), "zero_init"),
])
def test_recipe_options_refused_by_name(kw, message):
    d = {**tiny().to_dict(), **kw}
    with pytest.raises(ConfigError, match="model config") as e:
        dataclass_from_dict(ModelConfig, d, "model config").validate()
    assert message in str(e.value)


def test_lora_on_relu2_has_no_w3():
    from model import LoRAConfig, add_lora, merge_lora
    m = make(activation="relu2")
    with pytest.raises(ConfigError, match="w3 is SwiGLU's; this model's activation is relu2"):
        add_lora(m, LoRAConfig(targets=["wq", "w3"]))
    add_lora(m, LoRAConfig(targets=["wq", "w1", "w2"]))
    assert {n.split(".")[-2] for n, p in m.named_parameters() if "lora_" in n} == {"wq", "w1", "w2"}
    merge_lora(m)
    assert not [n for n, _ in m.named_parameters() if "lora_" in n]
