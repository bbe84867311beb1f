"""
The one model of the pipeline: a GPT-2, used as policy, reference policy, reward model and value network.

Policy and reference carry the language-model head; the reward model and the value network carry a scalar head
instead (the paper's section 3.4: "a randomly initialized linear head that outputs a scalar value"). Module names
and shapes are GPT-2's, so the Hugging Face checkpoints map one to one (support/hf.py reads and writes them).

Besides the model this file holds what the stages compute with it: sampling with a KV cache, the log-probs of a
response, the reward read at the EOS token, and mixed precision (the optimizer and learning rates: support/optim.py).
tests/test_model.py shows each property the stages rely on (left padding changes nothing, the KV cache changes
nothing, the scalar head is read at the EOS) on tiny random models.
"""
import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from support import attention

# The logit of a padded vocabulary row: exp(-1e4) is exactly 0 in every float type, yet the value stays finite under
# a temperature and in bf16, so p * log p is 0 (not NaN) in an entropy.
MASKED_LOGIT = -1e4

# GPT-2's four sizes (Radford et al. 2019); everything else is shared: 1024 positions, the 50257-token BPE.
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
# The synthetic task's sizes, trained from scratch: its model-size axis (the paper's runs 1.3B to 12.9B). Parameters
# without the embeddings: 0.06M, 0.34M, 0.79M, 1.24M (22x), chosen so that tools/findings.py runs all four, 2 seeds
# each, in about 2 hours on 2 cores (a 6 x 192 synth-l, 2.7M, needed 15 minutes for its SFT alone). The quick start
# trains synth-s.
SYNTH_SIZES = {
    "synth-xs": dict(n_layer=2, n_head=2, n_embd=48),
    "synth-s": dict(n_layer=3, n_head=4, n_embd=96),
    "synth-m": dict(n_layer=4, n_head=4, n_embd=128),
    "synth-l": dict(n_layer=4, n_head=4, n_embd=160),
}


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # real tokens: the tokenizer's n_vocab (EOS included, PAD not)
    block_size: int = 1024  # learned positions
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # off in every RLHF stage (a PPO ratio of exactly 1 needs a deterministic forward)
    layer_norm_eps: float = 1e-5
    head: str = "lm"  # "lm": next-token logits; "scalar": one number per position (reward model, value network)

    @property
    def padded_vocab_size(self):
        # Rounded up to a multiple of 64 for fast matmuls (50257 -> 50304), always leaving at least one spare row:
        # row `vocab_size` is the PAD embedding. Padded rows are never predicted: forward() masks their logits.
        return (self.vocab_size + 1 + 63) // 64 * 64


def visible(first_real):
    """The attention pattern as code, FlexAttention's mask_mod: in row b, query q may read key k when k is not in the
    future (k <= q) and not the row's left padding (k >= first_real[b]). Right padding after an EOS lies in every real
    query's future. A left-padding query reads nothing; its output is never read (and is 0, not NaN: see
    support/attention.py).

    Why a function and not a (B, T, T) tensor: RLHF batches are left padded (every prompt ends where the response
    starts), and a tldr batch of queries up to 512 tokens is often 30-50% padding. Cut into 128 x 128 blocks, the
    pattern hides whole blocks: the upper triangle and every padded column block. FlexAttention compiles this function
    into one kernel that skips those blocks; SDPA, handed the same pattern as a dense mask, computes them all."""
    def mask_mod(b, h, q, k):
        return (k <= q) & (k >= first_real[b])
    return mask_mod


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k and v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, attn_mask, is_causal, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.write(layer, k, v)  # (B, nh, T_past + T, hs)
        # FlexAttention when attn_mask is a block mask, else SDPA (support/attention.py says which runs where)
        y = attention.attend(q, k, v, attn_mask, is_causal, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        # GPT-2 uses the tanh approximation of GELU ("gelu_new" in Hugging Face configs); the exact erf form would
        # shift pretrained logits by ~1e-3.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, attn_mask, is_causal, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), attn_mask, is_causal, cache, layer)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Keys and values of every layer for one batch, allocated once for prompt + new tokens.

    Besides k and v it remembers which cached positions are real tokens (so padded keys stay masked while decoding)
    and how many real tokens each row has seen (the position of its next token).

    After make_static() every decoding step has the same shapes: it writes at a position held in a tensor and attends
    over the whole cache, whose unwritten keys are masked. torch.compile then captures the step once (on a GPU as a
    CUDA graph, which removes the per-kernel launch cost that bounds decoding) instead of once per length."""

    def __init__(self, n_layer, batch, max_len, device):
        self.n_layer, self.max_len = n_layer, max_len
        self.kv = None  # (n_layer, 2, B, nh, max_len, hs), allocated at the first write in the compute dtype
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.n_real = torch.zeros(batch, dtype=torch.long, device=device)
        self.len = 0  # positions filled so far (the same for every row: padding is part of the row)
        self.static, self.at = False, None

    def make_static(self):
        """Switch to fixed-shape single-token steps (after the prompt's pass has filled the cache)."""
        self.static, self.at = True, torch.tensor([self.len], device=self.valid.device)
        # Every step now reads the unwritten positions too (masked). Their memory must hold numbers: a masked key
        # gets weight 0, but 0 * NaN left in an uninitialized value is NaN in kernels that do not skip masked keys.
        self.kv[:, :, :, :, self.len:].zero_()
        for t in (self.kv, self.valid, self.n_real, self.at):  # the CUDA graph reads and writes them in place
            torch._dynamo.mark_static_address(t)

    def extend(self, valid):
        """Register T new positions (valid: (B, T) bool); returns the key mask of the whole cache (B, len + T), or
        in static mode of all max_len positions."""
        if self.static:
            return self.valid.index_copy_(1, self.at, valid)
        T = valid.size(1)
        if self.len + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.len} used, {T} more asked")
        self.valid[:, self.len:self.len + T] = valid
        return self.valid[:, :self.len + T]

    def write(self, layer, k, v):
        B, nh, T, hs = k.shape
        if self.static:
            self.kv[layer, 0].index_copy_(2, self.at, k)
            self.kv[layer, 1].index_copy_(2, self.at, v)
            return self.kv[layer, 0], self.kv[layer, 1]
        if self.kv is None:
            self.kv = torch.empty((self.n_layer, 2, B, nh, self.max_len, hs), dtype=k.dtype, device=k.device)
        self.kv[layer, 0, :, :, self.len:self.len + T] = k
        self.kv[layer, 1, :, :, self.len:self.len + T] = v
        return self.kv[layer, 0, :, :, :self.len + T], self.kv[layer, 1, :, :, :self.len + T]

    def advance(self, valid):
        self.n_real += valid.sum(1)
        if self.static:
            self.at += 1  # a tensor, so the captured step is the same at every position
        else:
            self.len += valid.size(1)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.head not in ("lm", "scalar"):
            raise ValueError(f"head must be 'lm' or 'scalar', not {cfg.head!r}")
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps),
        ))
        if cfg.head == "lm":
            self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
            self.lm_head.weight = self.transformer.wte.weight  # tied input and output embeddings, as in GPT-2
            # The padded vocabulary rows are masked, not cut: a bias of MASKED_LOGIT on their logits, added inside the
            # head's matmul. Cutting (a slice) would make every later softmax and its backward run on a strided copy
            # - a third of a small model's training step on a CPU - and the padded width keeps the matmul fast on GPUs.
            logit_bias = torch.zeros(cfg.padded_vocab_size)
            logit_bias[cfg.vocab_size:] = MASKED_LOGIT
            self.register_buffer("logit_bias", logit_bias, persistent=False)
        else:
            self.score = nn.Linear(cfg.n_embd, 1)
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) so the residual stream's variance does not
        # grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        with torch.no_grad():  # the padding rows: never predicted, and the PAD row's input is never read
            self.transformer.wte.weight[cfg.vocab_size:].zero_()
        if cfg.head == "scalar":
            self.init_scalar_head()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def init_scalar_head(self):
        # The paper says only "a randomly initialized linear head" (section 3.4); this init is OpenAI's released
        # code's (from lm-human-preferences): N(0, 1/(d_model + 1)), i.e. std 1/sqrt(d + 1), so the initial rewards
        # have unit scale. Bias 0; reward.py later sets it so the references score 0 on average (section 3.4).
        nn.init.normal_(self.score.weight, mean=0.0, std=1.0 / math.sqrt(self.config.n_embd + 1))
        nn.init.zeros_(self.score.bias)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, attention_mask=None, cache=None, head_from=0):
        """idx: (B, T) token ids; attention_mask: (B, T), 1 for real tokens, 0 for padding (left padding of a
        query, or right padding after a response's EOS). Returns (B, T - head_from, padded_vocab_size) logits for
        the LM head - the padded vocabulary rows are included but masked to MASKED_LOGIT, so they get probability
        exactly 0 and are never sampled - or (B, T - head_from) values for the scalar head. head_from skips the head
        on positions nobody reads (the prompt, in PPO and sampling).

        Each row's positions count from its first real token, so a left-padded row computes exactly what the same
        row computes unpadded; padded keys are masked. With a cache, idx holds the new tokens only."""
        B, T = idx.shape
        past = 0 if cache is None else cache.len
        valid = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        start = 0 if cache is None else cache.n_real[:, None]
        pos = (start + valid.long().cumsum(1) - 1).clamp(min=0)  # (B, T); padding sits at position 0, unread
        keys_valid = valid if cache is None else cache.extend(valid)  # (B, past + T)
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds the model's {self.config.block_size} positions")

        if cache is not None and cache.static:  # one token per row: the unwritten keys are masked, so no causal mask
            attn_mask, is_causal = keys_valid[:, None, None, :], False  # (B, 1, 1, max_len)
        elif keys_valid.all() and (past == 0 or T == 1):
            attn_mask, is_causal = None, T > 1  # the fast paths: plain causal attention, or one token seeing all
        else:  # padding: the pattern visible() defines, shared by every layer
            trainable = any(p.requires_grad for p in self.parameters())
            pattern = visible(attention.first_real(keys_valid))
            attn_mask, is_causal = attention.build(pattern, B, T, past + T, idx.device, trainable), False

        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, attn_mask, is_causal, cache, i)
        if cache is not None:
            cache.advance(valid)
        x = self.transformer.ln_f(x[:, head_from:])
        if self.config.head == "scalar":
            return self.score(x).squeeze(-1)
        return F.linear(x, self.lm_head.weight, self.logit_bias)

    @torch.no_grad()
    def generate(self, idx, attention_mask=None, max_new_tokens=48, temperature=1.0, eos_id=None, pad_id=None,
                 generator=None, return_logprobs=False, noise=None, compile=False):
        """Sample max_new_tokens after left-padded prompts idx (B, T), with a KV cache.

        temperature 0 is argmax; otherwise pure sampling from softmax(logits / temperature) (no top-k, no top-p:
        PPO's log-probs must describe exactly what was sampled). The randomness is the generator's stream, or with
        noise (B, max_new_tokens) each row's own uniforms (see row_noise), so that a row's sample does not depend on
        the rows beside it. Once a row has produced eos_id, its later tokens are pad_id (default: the PAD row,
        vocab_size) and sampling stops when every row is done. compile: the one-token steps run through
        torch.compile on a static cache (see KVCache.make_static); the same tokens up to float rounding, and worth it
        when many batches of one shape follow (a prompt of another length or batch size compiles the step again).
        Returns the (B, T + N) tokens, and with return_logprobs also the (B, N) log-probs of the new tokens (0 after
        EOS)."""
        B, T = idx.shape
        cfg = self.config
        if T + max_new_tokens > cfg.block_size:
            raise ValueError(f"{T} prompt + {max_new_tokens} new tokens exceed the model's {cfg.block_size} positions")
        pad_id = cfg.vocab_size if pad_id is None else pad_id
        cache = KVCache(cfg.n_layer, B, T + max_new_tokens, idx.device)
        new = torch.full((B, max_new_tokens), pad_id, dtype=idx.dtype, device=idx.device)
        logprobs = torch.zeros(B, max_new_tokens, device=idx.device)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        logits = self(idx, attention_mask, cache=cache, head_from=T - 1)[:, -1]  # the prompt, in one pass
        step = self
        if compile:
            cache.make_static()
            step = compiled_decoder(self)
        for t in range(max_new_tokens):
            tok, logp = sample_token(logits, temperature, generator, None if noise is None else noise[:, t])
            tok = torch.where(done, pad_id, tok)
            new[:, t] = tok
            logprobs[:, t] = torch.where(done, 0.0, logp)
            if eos_id is not None:
                done |= tok == eos_id
                if done.all():
                    break
            if t + 1 < max_new_tokens:
                logits = step(tok[:, None], cache=cache)[:, -1]
        if not torch.isfinite(logprobs).all():  # NaN logits still give tokens (argmax, the CDF search): say so
            raise FloatingPointError("generate: the model's logits are not finite (NaN or inf): its weights diverged; "
                                     "train it anew with other settings (a lower learning rate)")
        out = torch.cat([idx, new], dim=1)
        return (out, logprobs) if return_logprobs else out


_COMPILED = {}


def _decode(model, tok, cache):
    return model(tok, cache=cache)


def compiled_decoder(model):
    """model's forward compiled for static-cache steps, as a function of (tokens, cache). On a GPU it runs as a CUDA
    graph ("reduce-overhead"), which replays the step's hundreds of small kernels as one launch; the graph is
    recorded once per model and shape, then reused."""
    device = next(model.parameters()).device.type
    if device not in _COMPILED:
        _COMPILED[device] = torch.compile(_decode, mode="reduce-overhead" if device == "cuda" else None,
                                          fullgraph=True, dynamic=False)
    return lambda tok, cache: _COMPILED[device](model, tok, cache)


# --------------------------------------------------------------------------------------------------------------------
# what the stages compute with the model. Free functions of a module, not methods: they work the same on a bare GPT
# and on one wrapped for training (DDP, torch.compile), whose forward must run through the wrapper.

def response_logprobs(model, tokens, attention_mask, n_query, temperature=1.0, with_entropy=False):
    """Log-probs of the response tokens tokens[:, n_query:] given everything before them, at a temperature.

    The logits are divided by the same temperature used when sampling, so these log-probs describe the distribution
    the tokens were drawn from (PPO's first ratio is then exactly 1). log_softmax runs in fp32. Returns (B, R)
    log-probs, and (B, R) entropies when with_entropy."""
    logits = model(tokens, attention_mask, head_from=n_query - 1)[:, :-1]  # position t predicts token t + 1
    logp_all = F.log_softmax(logits.float() / max(temperature, 1e-7), dim=-1)  # (B, R, V)
    logp = logp_all.gather(-1, tokens[:, n_query:, None]).squeeze(-1)
    if not with_entropy:
        return logp
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def reward_at_eos(model, tokens, attention_mask, eos_id, no_eos_score=None):
    """A scalar-head model's output at each row's last real token, which must be the response's EOS, whatever the
    padding on either side: the paper gives one reward for the entire summary (section 3.4), and OpenAI's released
    code reads it once the whole summary has been seen. A row that ran out of length before its EOS gets
    no_eos_score (PPO's penalty for a summary that never ends), or is an error where none is given: read anywhere
    else, the score would be of an unfinished summary. Returns (B,) fp32."""
    last = last_token_index(attention_mask)
    ended = tokens.gather(1, last[:, None]).squeeze(1) == eos_id
    values = model(tokens, attention_mask).float()  # (B, T); queued before the check, whose .all() waits on a GPU
    if no_eos_score is None and not ended.all():
        raise ValueError(f"rows {ended.logical_not().nonzero().flatten().tolist()} do not end with the EOS token "
                         f"{eos_id}: their reward would be read mid-summary")
    score = values.gather(1, last[:, None]).squeeze(1)
    return score if no_eos_score is None else torch.where(ended, score, torch.full_like(score, no_eos_score))


def last_token_index(attention_mask):
    """(B, T) mask -> (B,) index of each row's last real token (the EOS of a response, followed only by padding)."""
    T = attention_mask.size(1)
    return T - 1 - attention_mask.long().flip(1).argmax(1)


def sample_token(logits, temperature=1.0, generator=None, u=None):
    """One token per row from (B, V) logits: argmax at temperature 0, else a draw from softmax(logits / temperature)
    with the uniforms u (B,) in [0, 1), or fresh ones from the generator. Returns the (B,) tokens and their (B,)
    log-probs under that distribution (fp32)."""
    logp = F.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), dim=-1)
    if temperature > 0:
        # Inverse-CDF sampling: one uniform per row against the cumulative probabilities. The same distribution as
        # torch.multinomial, which on a CPU spends more time drawing 50k exponentials per row than the model spends
        # on the token.
        cdf = logp.exp().cumsum(-1)
        if u is None:
            u = torch.rand(cdf.size(0), device=cdf.device, generator=generator)
        u = u.to(cdf.device)[:, None] * cdf[:, -1:]
        tok = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=logits.size(-1) - 1)
    else:
        tok = logp.argmax(-1)
    return tok, logp.gather(1, tok[:, None]).squeeze(1)


def row_noise(seeds, n):
    """(len(seeds), n) uniforms in [0, 1), row i drawn from its own seed: the randomness of one episode's sample,
    whatever batch, micro-batch or process it is sampled in."""
    return torch.stack([torch.rand(n, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def trim_padding(tokens, pad_id):
    """Drop the columns that are padding in every row, at both ends of a (B, T) batch; returns the trimmed tokens and
    how many columns were cut on the left. Exact, since positions count from each row's first real token, and it
    saves the compute that fixed-length padding would waste (short synthetic posts, a batch of short responses)."""
    real = (tokens != pad_id).any(0)
    if not real.any():
        return tokens, 0
    first = int(real.int().argmax())
    last = tokens.size(1) - int(real.flip(0).int().argmax())
    return tokens[:, first:last], first


@torch.no_grad()
def sample_responses(model, queries, max_new_tokens, temperature, eos_id, pad_id, batch_size, device, dtype,
                     generator=None, desc=None):
    """Responses of a policy to (N, Lq) left-padded queries (numpy or torch), in batches with a progress bar.
    Returns (N, max_new_tokens) int64 tokens on the CPU: EOS included, PAD after it."""
    queries = torch.as_tensor(queries)
    out = []
    for i in tqdm(range(0, len(queries), batch_size), desc=desc, disable=desc is None, leave=False):
        q, _ = trim_padding(queries[i:i + batch_size].to(device=device, dtype=torch.long), pad_id)
        with autocast(device, dtype):
            tokens = model.generate(q, (q != pad_id).long(), max_new_tokens=max_new_tokens, temperature=temperature,
                                    eos_id=eos_id, pad_id=pad_id, generator=generator)
        out.append(tokens[:, q.size(1):].cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------------------------
# mixed precision

def pick_dtype(device, name="auto"):
    """bf16 where the GPU supports it, fp32 elsewhere (a CPU has no speed to gain from bf16 autocast)."""
    if name == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast(device, dtype):
    """Mixed precision as one visible context: weights stay fp32, matmuls run in dtype; fp32 means no autocast."""
    if dtype in (None, torch.float32):
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
