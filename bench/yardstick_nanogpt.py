"""Yardstick: nanoGPT's GPT-2 124M (LayerNorm without bias, GELU MLP, fused c_attn, SDPA causal,
tied head, vocab 50304) timed the way nanoGPT's bench.py does (compile, bf16 autocast, fused AdamW,
10 burn-in + 20 timed iterations, loss.item() each). Written for this comparison because
nanoGPT's own source is not reachable offline on the GPU machine.
    python3 bench/yardstick_nanogpt.py [BATCH]              # one fixed random batch (bench.py real_data=False)
    python3 bench/yardstick_nanogpt.py [BATCH] TOKENS.bin   # bench.py's default, real_data=True: each batch drawn
        from a uint16 token file (its openwebtext train.bin), pinned and copied while the GPU runs the forward
(Nano's bench.py also draws every batch from a token file, through train.py's sampler.)"""
import sys, time, math, numpy as np, torch, torch.nn as nn, torch.nn.functional as F
B, T, V, L, H, C = int(sys.argv[1]) if len(sys.argv) > 1 else 32, 1024, 50304, 12, 12, 768
torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True
torch.manual_seed(1337)
class Attn(nn.Module):
    def __init__(s):
        super().__init__(); s.c_attn = nn.Linear(C, 3 * C, bias=False); s.c_proj = nn.Linear(C, C, bias=False)
    def forward(s, x):
        q, k, v = s.c_attn(x).split(C, dim=2)
        q, k, v = [t.view(x.size(0), T, H, C // H).transpose(1, 2) for t in (q, k, v)]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return s.c_proj(y.transpose(1, 2).contiguous().view(x.size(0), T, C))
class Blk(nn.Module):
    def __init__(s):
        super().__init__(); s.ln_1 = nn.LayerNorm(C, bias=False); s.attn = Attn(); s.ln_2 = nn.LayerNorm(C, bias=False)
        s.c_fc = nn.Linear(C, 4 * C, bias=False); s.c_proj = nn.Linear(4 * C, C, bias=False)
    def forward(s, x):
        x = x + s.attn(s.ln_1(x)); return x + s.c_proj(F.gelu(s.c_fc(s.ln_2(x))))
class GPT(nn.Module):
    def __init__(s):
        super().__init__(); s.wte = nn.Embedding(V, C); s.wpe = nn.Embedding(T, C)
        s.h = nn.ModuleList([Blk() for _ in range(L)]); s.ln_f = nn.LayerNorm(C, bias=False)
        s.lm_head = nn.Linear(C, V, bias=False); s.wte.weight = s.lm_head.weight
        for n, p in s.named_parameters():
            if p.dim() == 2: nn.init.normal_(p, std=0.02 / (math.sqrt(2 * L) if n.endswith("c_proj.weight") else 1))
    def forward(s, idx, tgt):
        x = s.wte(idx) + s.wpe(torch.arange(T, device=idx.device))
        for b in s.h: x = b(x)
        logits = s.lm_head(s.ln_f(x))
        return F.cross_entropy(logits.view(-1, V), tgt.view(-1))
m = GPT().cuda()
decay = [p for p in m.parameters() if p.dim() >= 2]; nodecay = [p for p in m.parameters() if p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-2}, {"params": nodecay, "weight_decay": 0}], lr=1e-4, betas=(0.9, 0.95), fused=True)
m = torch.compile(m)
if len(sys.argv) > 2:
    data = np.memmap(sys.argv[2], dtype=np.uint16, mode="r")
    def get_batch():
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
        return x.pin_memory().to("cuda", non_blocking=True), y.pin_memory().to("cuda", non_blocking=True)
else:
    fixed = (torch.randint(50257, (B, T), device="cuda"), torch.randint(50257, (B, T), device="cuda"))
    get_batch = lambda: fixed
torch.cuda.synchronize()
for stage, n in enumerate([10, 20]):
    t0 = time.time()
    x, y = get_batch()
    for _ in range(n):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(x, y)
        x, y = get_batch()  # the next batch while the GPU runs this forward
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); loss.item()
    torch.cuda.synchronize()
    if stage == 1:
        ms = (time.time() - t0) / n * 1000
        how = "real data" if len(sys.argv) > 2 else "fixed batch"
        print(f"nanoGPT-yardstick b{B} ({how}): {ms:.2f} ms/iter, {B * T / ms * 1000:,.0f} tok/s")
