"""The optimizer every stage uses, its one update step, and the learning-rate schedules (the paper's, appendix B.1)."""
import math

import torch


def configure_optimizers(model, lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, device_type="cpu", verbose=True):
    """AdamW with weight decay on the 2-D weights (matmuls, embeddings) only - not on biases or layer norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    if verbose:
        print(f"optimizer: {len(decay)} tensors with decay ({sum(p.numel() for p in decay):,} parameters), "
              f"{len(no_decay)} without ({sum(p.numel() for p in no_decay):,})")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device_type == "cuda")


def optimizer_step(optimizer, parameters, lr, grad_clip=0.0):
    """One update of every stage: set the learning rate, clip the gradient norm (0: off), step, clear gradients."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def cosine_lr(step, total, peak, warmup=0.0):
    """The paper's schedule for SFT and the reward model: linear warm-up over a fraction of the steps, then cosine
    decay to 0."""
    warm = int(warmup * total)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


# The paper's learning rates (appendix B.1) at its two sizes, 1.3B and 6.7B parameters. GPT-2's sizes lie outside
# that range, so defaults come from the power law through those two points (lr ~ N^-0.49 for SFT, N^-0.67 for the
# RM, N^-0.46 for PPO): e.g. SFT 2.0e-4 at 124M, 5.9e-5 at 1.5B. An extrapolation, documented as such in --help.
PAPER_LR = {"sft": (6.35e-5, 2.83e-5), "reward": (1.5e-5, 5e-6), "ppo": (1.5e-5, 7e-6)}


def paper_lr(stage, n_params):
    lr_small, lr_large = PAPER_LR[stage]
    slope = math.log(lr_large / lr_small) / math.log(6.7e9 / 1.3e9)
    return lr_small * (n_params / 1.3e9) ** slope
