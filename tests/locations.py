"""Where the tests find what the project does not ship, and cannot download offline:
- the GPT-2 BPE's cached ranks, for tiktoken (TIKTOKEN_CACHE_DIR);
- a few lines of each of OpenAI's released files, in their original layout (TLDR_SAMPLE_DIR: tldr_3_filtered splits,
  comparisons/, axis_evals/, cnndm files), to test the readers and the tldr path on real records.
Unset, both default to folders of a `shared` checkout beside this one (how CI lays them out). Tests that need them
skip, saying which is missing."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIKTOKEN = Path(os.environ.get("TIKTOKEN_CACHE_DIR") or ROOT.parent / "shared" / "tiktoken")
SAMPLE = Path(os.environ.get("TLDR_SAMPLE_DIR") or ROOT.parent / "shared" / "data" / "openai-sample")
if "TIKTOKEN_CACHE_DIR" not in os.environ and TIKTOKEN.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(TIKTOKEN)
