"""
Plumbing that the stages use and a reader of the RLHF code may skip: file formats, downloads, checkpoint files,
torchrun, the HTTP judge, the optimizer and the flags every stage shares. The ideas live in the top-level files
(model.py, data.py, sft.py, reward.py, ppo.py, evaluate.py, synth.py); nothing here is needed to follow them.

    checkpoint.py    checkpoints as plain dicts of tensors: save, load with checks, resume state, rebuild the model
    cli.py           the flags every stage shares (task, files, seed, device, precision, resume) and the device
    distributed.py   torchrun: DDP helpers that do nothing in a single process
    files.py         the one atomic file writer and the one resumable downloader
    hf.py            Hugging Face GPT-2 checkpoints in and out (safetensors by hand; python -m support.hf export)
    http_judge.py    an LLM judge over an OpenAI-compatible chat-completions API (evaluate.py --judge http)
    optim.py         AdamW, the one optimizer step of every stage, the cosine schedule, the paper's learning rates
    openai_data.py   fetching OpenAI's released TL;DR, comparisons and CNN/DM articles (python -m support.openai_data)
    ppo_run.py       what a PPO run does around ppo.py's loop: flags, models, prompts, evaluation, log, resume
    steplog.py       one printed line and one JSON line per step, on rank 0, continued cleanly on --resume
"""
