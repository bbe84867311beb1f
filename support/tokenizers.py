"""The two tokenizers: GPT-2's BPE for the real task, and a word-level one for the synthetic world. EOS is
`enc.eot_token` in both; PAD is data.pad_id(enc)."""
import functools
import re

import tiktoken

from support.formats import DataError, synthetic_world

SYNTH_TOKENIZER = "synth-words-v2"

# GPT-2's pre-tokenizer regex. The synthetic tokenizer uses it too, so each world word is one regex piece.
PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The same on ASCII text, in Python's re (no \p{..} classes): synth.py splits the world's text into words with it.
PAT_ASCII = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")


@functools.lru_cache(maxsize=None)
def get_tokenizer(name):
    """'gpt2' (GPT-2 BPE, tiktoken's r50k_base) or the synthetic world's (SYNTH_TOKENIZER). EOS is `enc.eot_token`,
    PAD is data.pad_id(enc)."""
    if name == "gpt2":
        try:
            return tiktoken.get_encoding("r50k_base")
        except Exception as e:  # tiktoken raises whatever its HTTP client raises when it cannot fetch the ranks
            raise DataError("could not load the GPT-2 BPE (tiktoken r50k_base). Offline, set TIKTOKEN_CACHE_DIR to a "
                            f"folder holding the cached ranks (tiktoken stores them there when online): {e}") from e
    if name == SYNTH_TOKENIZER:
        # Word level: the 256 single bytes (so any text still encodes) plus every word of the closed synthetic world,
        # with and without its leading space, as one token each. tiktoken maps a regex piece found in the ranks
        # straight to its id, so no merge chain is needed. Sequences are ~5x shorter than bytes and copying a fact
        # from the post is a one-token act, which is what lets a tiny CPU model learn the task in minutes.
        ranks = {bytes([b]): b for b in range(256)}
        for word in sorted(synthetic_world("words")()):
            for piece in (word, " " + word):
                ranks.setdefault(piece.encode(), len(ranks))
        return tiktoken.Encoding(name, pat_str=PAT, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": len(ranks)})
    raise DataError(f"unknown tokenizer {name!r}; expected 'gpt2' or {SYNTH_TOKENIZER!r}")
