#!/usr/bin/env bash
# Everything worth measuring on one GPU, in one go (sized for under 8 minutes on an H200; nothing is downloaded):
#   1. the test suite's quick tests (the end-to-end ones run on CPUs in CI);
#   2. tools/bench.py at GPT-2 small: training at 16 x 1024, sampling 128 x (512 + 48) eager, compiled and with
#      transformers' generate side by side (where transformers is installed), and one PPO update at the tldr settings
#      with and without --compile; then, at 124M and 774M, FlexAttention against SDPA on left-padded batches: the
#      attention alone and a scoring forward at the tldr shape; a 124M training step on each kernel;
#   3. three updates of `python ppo.py --task tldr` at the paper's settings (512 episodes, 4 epochs) on random
#      GPT-2-small weights and real sample posts, repeated to fill a rollout batch (a speed check, not a result).
#      The GPT-2 BPE and the sample posts are found where the tests find them (tests/locations.py).
#
#     bash tools/gpu_check.sh 2>&1 | tee gpu_check.log
#     PRESET=gpt2-large bash tools/gpu_check.sh      # another size for step 3 (gpt2, gpt2-medium, gpt2-large, gpt2-xl)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${TIKTOKEN_CACHE_DIR:-}" ] && [ -d ../shared/tiktoken ]; then
    export TIKTOKEN_CACHE_DIR="$(cd ../shared/tiktoken && pwd)"
fi
SAMPLE=${TLDR_SAMPLE_DIR:-../shared/data/openai-sample}
PRESET=${PRESET:-gpt2}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
stamp() { echo; echo "==== $(date +%T) $*"; }

stamp "1/3 quick tests"
python -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
python -m pytest tests -q -x -m "not slow"

stamp "2/3 tools/bench.py, 124m"
python tools/bench.py --shapes 124m --cases train sample-cache sample-compile sample-hf ppo --train-batch 16 \
    --train-len 1024 --sample-batch 128 --prompt-len 512 --repeats 3
python tools/bench.py --shapes 124m --cases train ppo --train-batch 16 --train-len 1024 --compile
stamp "2/3 the attention kernels: FlexAttention against SDPA on left-padded batches"
python tools/bench.py --shapes 124m 774m --cases attention score
for kernel in flex sdpa; do
    python tools/bench.py --shapes 124m --cases train --train-batch 16 --train-len 1024 --pad-frac 0.4 \
        --attention $kernel
done

stamp "3/3 ppo.py --task tldr, 3 updates, $PRESET with random weights"
posts=$SAMPLE/derived/tldr_3_filtered_format_from_batch18_refs.jsonl
if [ ! -f "$posts" ]; then
    echo "skipped: needs the sample posts $posts"
    exit 0
fi
mkdir -p "$work/data" "$work/out"
for split in train valid test; do  # 110 posts, five times over: a rollout batch of 512 needs 512 posts
    for _ in 1 2 3 4 5; do cat "$posts"; done > "$work/data/$split.jsonl"
done
python - "$work" "$PRESET" <<'EOF'
import sys
from model import GPT, GPTConfig, PRESETS
from support.checkpoint import save_checkpoint
work, preset = sys.argv[1:]
for stage, head in (("sft", "lm"), ("reward", "scalar")):
    model = GPT(GPTConfig(**PRESETS[preset], head=head))
    extra = dict(norm_bias=0.0) if stage == "reward" else {}
    save_checkpoint(f"{work}/out/{stage}.pt", model, stage=stage, task="tldr", tokenizer="r50k_base", **extra)
EOF
for compile in "" "--compile"; do
    python ppo.py --task tldr --data-dir "$work/data" --out-dir "$work/out" --cache-dir "$work/cache" --episodes 1536 \
        --eval-every 1000 --eval-n 16 --save-every 1000 $compile 2>&1 | grep -E "^(ppo|update)" | cut -c1-240
done
