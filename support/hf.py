"""
Hugging Face GPT-2 checkpoints in and out, without transformers or the safetensors package: `from_pretrained` reads
a directory holding config.json + model.safetensors (or downloads one of GPT-2's four sizes once), `export` writes a
policy back in the layout of transformers' GPT2LMHeadModel.

    python -m support.hf export out/synth/ppo.pt hf/ppo     # a checkpoint -> config.json + model.safetensors

safetensors, read and written by hand: 8 bytes little-endian header length, a JSON header mapping each name to its
dtype, shape and [begin, end) byte offsets in the data that follows, then the raw little-endian tensor bytes.
"""
import argparse
import json
import math
import os
import struct
import sys
from pathlib import Path

import torch

from model import GPT, PRESETS, GPTConfig
from support.checkpoint import POLICY_STAGES, CheckpointError, load_checkpoint, model_from_checkpoint
from support.files import atomic_open, atomic_write, download

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
# HF's GPT-2 stores these as Conv1D weights, (in, out); nn.Linear wants (out, in).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def read_safetensors(path):
    path = Path(path)
    data = bytearray(path.stat().st_size)  # writable, so torch.frombuffer can view it without a warning
    with open(path, "rb") as f:
        f.readinto(data)
    if len(data) < 8:
        raise ValueError(f"{path}: not a safetensors file (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file (bad JSON header: {e})") from None
    body = memoryview(data)[8 + n:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        count = math.prod(info["shape"])
        if end - begin != count * torch.tensor([], dtype=dtype).element_size() or end > len(body):
            raise ValueError(f"{path}: tensor {name} has inconsistent offsets {begin}..{end}")
        t = torch.frombuffer(body, dtype=dtype, count=count, offset=begin) if count else torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(info["shape"]).clone()  # clone: own the memory, not the file's buffer
    return tensors


def write_safetensors(path, tensors):
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header so the data starts 8-byte aligned
    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def hf_files(name_or_dir):
    """A folder with config.json + model.safetensors: the given directory, or the cached download of a GPT-2 name."""
    p = Path(name_or_dir)
    if p.is_dir():
        for f in ("config.json", "model.safetensors"):
            if not (p / f).is_file():
                raise FileNotFoundError(f"{p / f} is missing: a Hugging Face GPT-2 directory needs config.json and "
                                        "model.safetensors")
        return p
    if name_or_dir not in PRESETS:
        raise ValueError(f"unknown model {name_or_dir!r}: give one of {', '.join(PRESETS)} or a directory holding "
                         "config.json and model.safetensors")
    folder = Path(os.environ.get("TLDR_RLHF_CACHE", Path.home() / ".cache" / "tldr-rlhf")) / name_or_dir
    endpoint = os.environ.get("TLDR_RLHF_HF_ENDPOINT", "https://huggingface.co")
    for f in ("config.json", "model.safetensors"):
        if not (folder / f).is_file():
            download(f"{endpoint}/{name_or_dir}/resolve/main/{f}", folder / f,
                     hint=f"With no network, put config.json and model.safetensors of the Hugging Face repo "
                          f"'{name_or_dir}' in {folder}/ (or pass a local directory instead of the name).")
    return folder


def from_pretrained(name_or_dir, head="lm"):
    """A GPT-2 from a Hugging Face checkpoint: a directory with config.json + model.safetensors, or one of the names
    in model.PRESETS (downloaded once into the cache, see hf_files). Every key and shape is checked."""
    folder = hf_files(name_or_dir)
    hf_cfg = json.loads((folder / "config.json").read_text())
    if hf_cfg.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise ValueError(f"{folder}/config.json: activation {hf_cfg['activation_function']!r} is not GPT-2's")
    variant = (hf_cfg.get("scale_attn_by_inverse_layer_idx") or hf_cfg.get("add_cross_attention")
               or not hf_cfg.get("scale_attn_weights", True)
               or hf_cfg.get("n_inner") not in (None, 4 * hf_cfg["n_embd"]))
    if variant:
        raise ValueError(f"{folder}/config.json: variants beyond GPT-2's architecture are not supported")
    cfg = GPTConfig(vocab_size=hf_cfg["vocab_size"], block_size=hf_cfg.get("n_positions", hf_cfg.get("n_ctx")),
                    n_layer=hf_cfg["n_layer"], n_head=hf_cfg["n_head"], n_embd=hf_cfg["n_embd"],
                    layer_norm_eps=hf_cfg.get("layer_norm_epsilon", 1e-5), head=head)
    model = GPT(cfg)
    hf = {k.removeprefix("transformer."): v for k, v in read_safetensors(folder / "model.safetensors").items()}
    # Old checkpoints also store the causal-mask buffers; the LM head is the (tied) token embedding.
    buffers = (".attn.bias", ".attn.masked_bias")
    hf = {k: v for k, v in hf.items() if not k.endswith(buffers) and k != "lm_head.weight"}
    ours = {k: v for k, v in model.state_dict().items() if k.startswith("transformer.")}
    missing = sorted(k.removeprefix("transformer.") for k in ours if k.removeprefix("transformer.") not in hf)
    unexpected = sorted(set(hf) - {k.removeprefix("transformer.") for k in ours})
    if missing or unexpected:
        raise ValueError(f"{folder}/model.safetensors does not match GPT-2: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for key, param in ours.items():
            src = hf[key.removeprefix("transformer.")].float()
            if key.endswith(CONV1D_WEIGHTS):
                src = src.t()
            if key == "transformer.wte.weight":
                assert src.shape == (cfg.vocab_size, cfg.n_embd), (key, src.shape)
                param[: cfg.vocab_size].copy_(src)  # the padding rows stay zero
            else:
                assert src.shape == param.shape, (key, tuple(src.shape), tuple(param.shape))
                param.copy_(src)
    return model


def export(model, out_dir, eos_id=None):
    """Write config.json + model.safetensors in the layout of Hugging Face's GPT2LMHeadModel, so a policy trained
    here loads in transformers (GPT2LMHeadModel.from_pretrained) and in tools that read that layout."""
    cfg = model.config
    if cfg.head != "lm":
        raise ValueError("only language-model policies export to the GPT-2 layout (this model has a scalar head)")
    out_dir = Path(out_dir)
    tensors = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to wte; transformers re-ties it on load
        t = t.detach().float().cpu()
        if key == "transformer.wte.weight":
            t = t[: cfg.vocab_size]
        elif key.endswith(CONV1D_WEIGHTS):
            t = t.t()
        tensors[key] = t.contiguous()
    eos = cfg.vocab_size - 1 if eos_id is None else eos_id  # GPT-2's <|endoftext|> is its last token
    hf_cfg = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=cfg.vocab_size,
                  n_positions=cfg.block_size, n_ctx=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                  n_head=cfg.n_head, n_inner=None, activation_function="gelu_new", resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=cfg.layer_norm_eps,
                  initializer_range=0.02, bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=True,
                  scale_attn_weights=True, use_cache=True, torch_dtype="float32")
    write_safetensors(out_dir / "model.safetensors", tensors)
    atomic_write(out_dir / "config.json", json.dumps(hf_cfg, indent=2) + "\n")


def export_command(checkpoint, out_dir):
    """A policy checkpoint (sft.pt / ppo.pt) as a Hugging Face GPT-2 directory; a checkpoint that is not a policy's
    is one line naming it."""
    try:
        ckpt = load_checkpoint(checkpoint, stage=POLICY_STAGES)
        export(model_from_checkpoint(ckpt), out_dir)
    except (CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out_dir}/config.json and model.safetensors (tokenizer: {ckpt['tokenizer']})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="write a policy checkpoint as a Hugging Face GPT-2 directory")
    exp.add_argument("checkpoint", help="an sft.pt or ppo.pt written by this project")
    exp.add_argument("out_dir", help="directory for config.json and model.safetensors")
    args = parser.parse_args(argv)
    export_command(args.checkpoint, args.out_dir)


if __name__ == "__main__":
    main()
