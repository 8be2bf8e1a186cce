"""
Muon: MomentUm Orthogonalized by Newton-Schulz (Keller Jordan et al., 2024), with AdamW for the rest.

    optimizer = Muon(model, lr=2e-3, muon_lr=0.02, weight_decay=0.1)   # train config optimizer "muon"

The hidden matrices of a Transformer (attention's wq, wk, wv, wo and the feed-forward's w1, w2, w3)
learn faster when each update is the momentum with its singular values all set to about 1: the
"orthogonalised" momentum, U V^T of its SVD U S V^T. A raw gradient step is dominated by a few large
singular directions; the orthogonalised one moves every direction the gradient found by the same
amount, so rare directions learn as fast as common ones. Newton-Schulz iterations compute it
with five matrix products each, in bf16 on a GPU, instead of an SVD. The NanoGPT speedrun
(modded-nanogpt) reached GPT-2's loss in about 1.5x fewer steps with it.

Muon applies only to 2-D hidden matrices. The token embedding is a lookup table (each row sees only
its own token's gradient), the output head (the same matrix when tied) maps to a vocabulary, and norms
and biases are vectors: those keep AdamW, as in modded-nanogpt and nanochat. Parameters are sorted by
their shape and name, not by module type, so speed.py's Float8Linear (the same Parameters in another
module) changes nothing here.

One torch.optim.Optimizer holds both kinds as parameter groups, so everything train.py does with an
optimizer works unchanged: the learning-rate schedule (each group keeps its ratio to the base rate,
`lr_scale`), gradient clipping and the float16 loss scaler, state_dict() for checkpoints and exact
resume, and CUDA-graph capture (no host synchronisation; the learning rate may be a GPU tensor).

Grad accumulation and DDP: step() sees the gradient of the whole optimizer step, already summed
over micro-batches and averaged over ranks by DDP's all-reduce. Every rank then orthogonalises every
matrix itself, identically, so the weights stay equal on all ranks without another collective (the
simple choice: modded-nanogpt instead splits the matrices across ranks and gathers the updates, which
saves compute on many GPUs). DeepSpeed ZeRO-3 hands the optimizer flat shards of each matrix, which
cannot be orthogonalised: train_ds.py refuses optimizer "muon".
"""

import torch
from torch.optim.adamw import adamw as torch_adamw  # torch.optim.AdamW's arithmetic, as a function

# The quintic Newton-Schulz coefficients of modded-nanogpt: chosen to push every singular value in
# (0, 1] towards 1 as fast as possible in 5 steps. They do not converge exactly (singular values end
# in about [0.7, 1.2]), which costs nothing in training and keeps the iteration short.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5

# Momentum warms up from 0.85 to its final value over the first steps: a long memory of the first,
# large and quickly changing gradients would keep pushing in stale directions (modded-nanogpt, nanochat).
MOMENTUM_START, MOMENTUM_WARMUP_STEPS = 0.85, 300


def orthogonalise(g, steps=NS_STEPS):
    """The nearest semi-orthogonal matrix to each matrix of g ([..., rows, cols]): U V^T of its
    SVD, approximately, by Newton-Schulz iterations X <- a X + b (X X^T) X + c (X X^T)^2 X."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16() if g.is_cuda else g.float()  # bf16 is accurate enough and fast on tensor cores
    x = x.reshape(-1, *g.shape[-2:])  # a batch of matrices [n, rows, cols]
    wide = x.size(-2) <= x.size(-1)
    if not wide:  # iterate on the wide form: X X^T is then the smaller Gram matrix
        x = x.mT
    # the iteration converges for singular values in (0, 1]: the Frobenius norm bounds the largest
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        # baddbmm(input, p, q, beta, alpha) = beta input + alpha p @ q: each product scales and adds as it
        # goes, one kernel where the formula written out is four (a GPU step waits on every kernel)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b gram + c gram^2
        x = torch.baddbmm(x, poly, x, beta=a)  # a x + (b gram + c gram^2) x
    return (x if wide else x.mT).reshape(g.shape).to(g.dtype)


def split_parameters(model):
    """(hidden matrices for Muon, everything else for AdamW), both lists of (name, parameter) that
    require gradients. Hidden matrices: 2-D and not the token/position embeddings or the output head."""
    adamw_matrices = ("tok_embeddings.weight", "pos_embeddings.weight", "output.weight")
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (muon if p.dim() == 2 and name not in adamw_matrices else adamw).append((name, p))
    return muon, adamw


class Muon(torch.optim.Optimizer):
    """Muon for the hidden matrices, AdamW for the rest, as parameter groups of one optimizer.
    `lr` is the AdamW rate (train config learning_rate); the Muon groups run at muon_lr, and a
    schedule (train.set_lr) scales every group's rate by the same factor."""

    def __init__(self, model, lr, muon_lr=0.02, momentum=0.95, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        muon, adamw = split_parameters(model)
        if not muon:
            raise ValueError("Muon: the model has no hidden matrices to orthogonalise")
        groups = []
        # weight decay on matrices only, as train.param_groups does for AdamW
        for kind, params, decay in (("muon", [p for _, p in muon], weight_decay),
                                    ("adamw", [p for _, p in adamw if p.dim() >= 2], weight_decay),
                                    ("adamw", [p for _, p in adamw if p.dim() < 2], 0.0)):
            if params:
                scale = muon_lr / lr if kind == "muon" else 1.0
                groups.append({"params": params, "kind": kind, "lr_scale": scale, "lr": lr * scale,
                               "weight_decay": decay})
        super().__init__(groups, {"momentum": momentum, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self.muon_step if group["kind"] == "muon" else self.adamw_step)(group, params)

    def muon_step(self, group, params):
        lr, decay = group["lr"], group["weight_decay"]
        # Each line below is one operation over a whole list of matrices (torch._foreach_*, as
        # torch.optim's own optimizers do): a handful of kernels a step instead of several per matrix,
        # which is most of an optimizer step for a small model on a GPU.
        by_shape = {}  # the matrices of one shape are orthogonalised together, as one batch of products
        for p in params:
            by_shape.setdefault(p.shape, []).append(p)
        for shape, same in by_shape.items():
            states = [self.state[p] for p in same]
            for p, st in zip(same, states):
                if not st:
                    # `updates` counts this matrix's steps; a tensor on the device (no host sync under
                    # a CUDA graph) and saved with the state, so resume continues the warmup exactly
                    st["momentum_buffer"] = torch.zeros_like(p)
                    st["updates"] = torch.zeros((), device=p.device)
            # the momentum of this step, warming up from MOMENTUM_START over MOMENTUM_WARMUP_STEPS
            warm = torch.clamp(states[0]["updates"] / MOMENTUM_WARMUP_STEPS, max=1.0)
            momentum = MOMENTUM_START + warm * (group["momentum"] - MOMENTUM_START)
            grads, bufs = [p.grad for p in same], [st["momentum_buffer"] for st in states]
            torch._foreach_mul_(bufs, momentum)  # buf = momentum * buf + (1 - momentum) * grad
            torch._foreach_add_(bufs, torch._foreach_mul(grads, 1 - momentum))
            # Nesterov: step along the gradient as the momentum will see it, (1 - momentum) grad + momentum buf
            updates = torch._foreach_mul(grads, 1 - momentum)
            torch._foreach_add_(updates, torch._foreach_mul(bufs, momentum))
            torch._foreach_add_([st["updates"] for st in states], 1)
            orthogonal = orthogonalise(torch.stack(updates))
            # an orthogonal [rows, cols] matrix has entries of RMS 1/sqrt(max(rows, cols)); a tall one
            # (rows > cols) would get smaller updates per entry than the square ones: scale them back up
            rows, cols = shape
            orthogonal *= lr * max(1.0, rows / cols) ** 0.5
            torch._foreach_mul_(same, 1 - lr * decay)  # decoupled weight decay, as AdamW's
            torch._foreach_sub_(same, list(orthogonal.unbind()))

    def adamw_step(self, group, params):
        """AdamW (Loshchilov & Hutter): moving averages of the gradient and its square, bias-corrected,
        and decoupled weight decay. torch's own implementation (fused on CUDA), so these parameters
        train exactly as under optimizer "adamw"."""
        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            if not st:
                st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                st["updates"] = torch.zeros((), device=p.device)
        beta1, beta2 = group["betas"]
        fused = params[0].is_cuda  # the fused kernel keeps the step counts on the GPU (CUDA graphs)
        torch_adamw(
            params, [p.grad for p in params], [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
            [], [st["updates"] for st in states], fused=fused, foreach=False if fused else None,
            amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=False)
