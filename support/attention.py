"""Which kernel runs model.py's attention pattern (model.visible): FlexAttention, or SDPA with a dense mask.

FlexAttention compiles the pattern, a small function of (row, head, query position, key position), into one fused
kernel that skips every key block the pattern hides. SDPA gets the same function evaluated into a dense boolean mask
of (B, 1, T_q, T_kv) and computes every block. Both give the same numbers up to float rounding; this file picks one
per forward, compiles FlexAttention once per shape family, and falls back to SDPA, saying so once, where FlexAttention
cannot run: a torch without it, no working C++ compiler (the CPU kernel is compiled C++), a compile that fails, or a
training forward on a CPU (torch has no CPU kernel for FlexAttention's backward).

Where SDPA runs, the kernel is PyTorch's choice: without a mask (unpadded batches) FlashAttention on CUDA; with a
mask the memory-efficient kernel, which cannot skip a block; on the CPU its own flash-style kernel in both cases.
"""
import warnings

import torch
import torch.nn.functional as F

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # torch < 2.5
    BlockMask = create_block_mask = flex_attention = None

# "auto": FlexAttention where it measured faster than SDPA (MIN_LEN); "flex": wherever it can run; "sdpa": never.
MODE = "auto"
# The shortest padded sequence for which "auto" takes FlexAttention. A sequence needs several blocks before whole
# padded blocks can be skipped; below that the kernel's own cost loses to SDPA. Measured on a 2-core CPU (python
# tools/bench.py --shapes 124m --cases attention --attn-len L: 40% left padding, 64-position blocks, torch 2.14.1):
# 0.97x SDPA at 128 positions, 1.17x at 256, 1.45x at 384, 1.63x at 512. Unmeasured on a GPU: the same line until
# tools/gpu_check.sh says otherwise. The synthetic task's sequences (at most 152 positions) stay below it, so the quick
# start compiles nothing; tldr's (up to 512 + 48) do.
MIN_LEN = {"cpu": 256, "cuda": 256}
# The block size: a block of queries against a block of keys is skipped whole or computed. GPUs keep FlexAttention's
# default of 128 (its kernels' tile). On a CPU, 64 skips more of a left-padded batch: at 512 positions and 40% padding
# it measured 54 ms against 68 ms at 128 (SDPA: 91 ms), and 32 gained little more (52 ms).
BLOCK = {"cpu": 64, "cuda": 128}
_compiled = None
_failed = False  # set once FlexAttention failed to compile or run: SDPA from then on, for the whole process
_said = set()  # the fallbacks already reported, each once per process


def say_once(key, message):
    if key not in _said:
        _said.add(key)
        warnings.warn(message, stacklevel=3)


def first_real(valid):
    """(B, T) bool -> (B,) index of each row's first real token. A row's real tokens must be one run (left padding
    before the text, right padding after its EOS): the pattern is written in those terms."""
    starts = valid[:, 0].long() + (valid[:, 1:] & ~valid[:, :-1]).sum(1)
    if (starts > 1).any():
        row = int((starts > 1).nonzero()[0])
        raise ValueError(f"attention_mask row {row} has padding between real tokens; the model takes left padding "
                         "before the text and right padding after it, never inside it")
    return valid.int().argmax(1)


def use_flex(T_q, T_kv, device, trainable):
    if MODE == "sdpa" or _failed or T_q != T_kv:  # T_q < T_kv: decoding with a cache (one query row, no block to skip)
        return False
    if device.type == "cpu" and trainable:
        # No CPU backward. A model that trains keeps SDPA for all its forwards, scoring included: PPO's first ratio
        # is exactly 1 only if the log-probs it samples with and trains on come from the same kernel.
        return False
    if MODE == "auto" and T_q < MIN_LEN.get(device.type, MIN_LEN["cuda"]):
        return False
    if flex_attention is None:
        say_once("missing", f"torch {torch.__version__} has no FlexAttention (2.5 or newer has): attention runs on "
                 "SDPA with a dense mask")
        return False
    return True


def build(mask_mod, B, T_q, T_kv, device, trainable):
    """The mask every layer of one forward shares: FlexAttention's BlockMask when that kernel runs (built once per
    batch: evaluating the pattern per block is the costly part), else the dense (B, 1, T_q, T_kv) bool mask of the
    same mask_mod. The T_q queries are the last positions of the T_kv keys (a KV cache holds the rest)."""
    if use_flex(T_q, T_kv, device, trainable):
        # the length rounded up to whole blocks (attend pads q, k, v to it): one compiled kernel per batch size and
        # block count, not one per length
        block = BLOCK.get(device.type, BLOCK["cuda"])
        T = -(-T_q // block) * block
        return create_block_mask(mask_mod, B, None, T, T, device=device, BLOCK_SIZE=block)
    return dense(mask_mod, B, T_q, T_kv, device)


def dense(mask_mod, B, T_q, T_kv, device):
    """mask_mod evaluated at every (row, query, key). A query that may read no key (a left-padding position) gets an
    all-False row, for which FlexAttention returns 0 but SDPA returns NaN, and a NaN value feeds every later layer
    through the residual. So here such a query reads itself: its output is never read, and it stays finite."""
    b = torch.arange(B, device=device)[:, None, None]
    q = torch.arange(T_kv - T_q, T_kv, device=device)[None, :, None]
    k = torch.arange(T_kv, device=device)[None, None, :]
    return (mask_mod(b, None, q, k) | (k == q))[:, None]


def attend(q, k, v, attn_mask, is_causal, dropout_p):
    """softmax(q k^T / sqrt(d)) v under attn_mask (a BlockMask, a dense bool mask, or None with is_causal)."""
    global _failed
    if BlockMask is not None and isinstance(attn_mask, BlockMask):
        if dropout_p == 0 and not _failed:  # (FlexAttention has no dropout; RLHF stages train without it)
            # Zeros appended up to the block mask's whole blocks: keys past the end lie in every real query's future,
            # and the queries past it are cut off again. The copy is also contiguous: the heads split off the fused
            # qkv matmul are strided views, which the compiled kernel reads half again as slowly (measured on a CPU).
            T, extra = q.size(2), attn_mask.seq_lengths[0] - q.size(2)
            try:
                q_, k_, v_ = (F.pad(t, (0, 0, 0, extra)).contiguous() for t in (q, k, v))
                return flex()(q_, k_, v_, block_mask=attn_mask)[:, :, :T]
            except Exception as e:  # a compiler missing or failing: every later forward takes SDPA
                _failed = True
                say_once("failed", f"FlexAttention could not run here ({type(e).__name__}: {str(e)[:200]}); "
                         "attention falls back to SDPA with a dense mask")
        attn_mask = dense(attn_mask.mask_mod, q.size(0), q.size(2), k.size(2), q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p)


def flex():
    """flex_attention compiled: eager it is a slow reference that materializes every score. Static shapes, compiled
    once per batch size and block count (seconds each on a CPU). Not dynamic shapes: on a CPU with torch 2.13-2.14, a
    second batch size in a process made the dynamic recompile emit C++ that does not build."""
    global _compiled
    if torch.compiler.is_compiling():  # inside a compiled model, whose own compile takes it in
        return flex_attention
    if _compiled is None:
        config = torch._dynamo.config  # each shape is a recompile of flex_attention: allow a few dozen, not 8
        setattr(config, "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit", 64)
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled
