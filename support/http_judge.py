"""
An LLM judge over an OpenAI-compatible chat-completions API (`evaluate.py --judge http`), for the real task where
there is no gold rubric: the threads, retries, budget and HTTP that evaluate.py's other judges do not need.
"""
import json
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

import data
from support import distributed
from support.cli import nonnegative_int, positive_float, positive_int


class JudgeError(RuntimeError):
    """The http judge cannot work: no model named, a refused key or address, a server that never answers."""


JUDGE_PROMPT = """\
Below are a {kind} and two summaries of it. Which summary conveys the most important points of the {kind} better? \
Weigh accuracy (it says nothing false), coverage (the key points are there and nothing unimportant is added) and \
coherence (it reads clearly on its own). Neither the order of the summaries nor their length should sway you.

{Kind}:
{source}

Summary A:{a}

Summary B:{b}

Give one short sentence of reasoning, then a last line that reads exactly "Preferred: A" or "Preferred: B"."""


def parse_verdict(reply):
    """'A' or 'B' from a judge's reply: its last "Preferred: X", or a reply that is just the letter; else None."""
    found = re.findall(r"preferred\W*([ab])\b", reply, flags=re.IGNORECASE)
    if found:
        return found[-1].upper()
    bare = reply.strip().strip(".*\"'` ").upper()
    return bare if bare in ("A", "B") else None


def add_http_args(p):
    g = p.add_argument_group("the http judge: an LLM over an OpenAI-compatible chat-completions API")
    g.add_argument("--judge-url", default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
                   help="the API's base address; <url>/chat/completions is called (env OPENAI_BASE_URL)")
    g.add_argument("--judge-model", default=os.environ.get("JUDGE_MODEL"), help="the model to ask (env JUDGE_MODEL)")
    g.add_argument("--judge-key", default=os.environ.get("OPENAI_API_KEY"), help="the bearer key (env "
                   "OPENAI_API_KEY); never written to eval.json")
    g.add_argument("--judge-timeout", type=positive_float, default=60.0, help="seconds to wait for one reply")
    g.add_argument("--judge-retries", type=nonnegative_int, default=3, help="retries of a request that timed out, "
                   "failed (429, 5xx) or got a reply without a verdict; a pair still without one is left out and "
                   "counted")
    g.add_argument("--judge-budget", type=positive_int, default=5000, help="requests at most, retries included")
    g.add_argument("--judge-workers", type=positive_int, default=4, help="requests in flight at once")


class HTTPJudge:
    """An LLM judge over an OpenAI-compatible chat-completions API, for the real task where there is no gold rubric.
    Each pair is shown in a seeded random A/B order, so a judge's bias for one position averages out. A request that
    times out, fails with 429/5xx or gets a reply without a verdict is retried with exponential backoff; 401, 403
    and 404 stop the run (a wrong key, model or address), as do 20 failures in a row. Identical summaries are a tie
    without a request."""

    def __init__(self, url, model, key=None, timeout=60.0, retries=3, budget=5000, workers=4, seed=0, backoff=1.0):
        if not model:
            raise JudgeError("--judge http needs a model: --judge-model or the JUDGE_MODEL environment variable")
        self.url, self.model, self.key = url.rstrip("/") + "/chat/completions", model, key
        self.timeout, self.retries, self.budget, self.workers, self.backoff = timeout, retries, budget, workers, backoff
        self.rng, self.lock, self.name = random.Random(seed), threading.Lock(), f"http:{model}"
        self.stats = dict(requests=0, failures=0, no_verdict=0, last_error=None)
        self.failures_in_a_row = 0

    def _post(self, prompt):
        body = json.dumps(dict(model=self.model, messages=[dict(role="user", content=prompt)], temperature=0,
                               max_tokens=100)).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read().decode())["choices"][0]["message"]["content"]

    def ask(self, prompt):
        """'A' or 'B'; None when every try failed or the budget is spent."""
        for attempt in range(self.retries + 1):
            with self.lock:
                if self.stats["requests"] >= self.budget:
                    return None
                self.stats["requests"] += 1
            try:
                answer = parse_verdict(self._post(prompt))
                why = None if answer else "a reply without a verdict"
            except urllib.error.HTTPError as e:
                if e.code in (401, 403, 404):
                    raise JudgeError(f"{self.url} answered {e.code} {e.reason}: check --judge-url, --judge-model and "
                                     "--judge-key") from None
                why = f"HTTP {e.code}"
            except (OSError, ValueError, KeyError, IndexError, TypeError) as e:  # timeouts, refused, malformed JSON
                why = f"{type(e).__name__}: {e}"
            with self.lock:
                if why is None:
                    self.failures_in_a_row = 0
                    return answer
                self.stats.update(failures=self.stats["failures"] + 1, last_error=why)
                self.failures_in_a_row += 1
                if self.failures_in_a_row >= 20:
                    raise JudgeError(f"{self.url}: 20 requests in a row failed, the last with {why}")
            if attempt < self.retries:
                time.sleep(self.backoff * 2 ** attempt)
        return None

    def prompt(self, record, a, b):
        if record.get("article"):
            return JUDGE_PROMPT.format(kind="news article", Kind="Article", source=record["article"].strip(), a=a, b=b)
        post = f"SUBREDDIT: r/{record.get('subreddit')}\nTITLE: {record.get('title')}\n\n{record['post'].strip()}"
        return JUDGE_PROMPT.format(kind="forum post", Kind="Post", source=post, a=a, b=b)

    def prefer(self, records, texts, baselines, ended=None):  # a cut summary is shown as the text it is
        flips = [self.rng.random() < 0.5 for _ in texts]  # drawn up front: the order does not depend on threads

        def one(i):
            a, b = data.as_response(texts[i]), data.as_response(baselines[i])
            if a == b:
                return 0.5
            answer = self.ask(self.prompt(records[i], *((b, a) if flips[i] else (a, b))))
            return np.nan if answer is None else float((answer == "A") != flips[i])

        out = np.empty(0)
        if distributed.is_main():  # under torchrun one process asks, and every process gets its verdicts
            with ThreadPoolExecutor(self.workers) as pool:
                out = np.array(list(tqdm(pool.map(one, range(len(texts))), total=len(texts), leave=False,
                                              desc=f"judge {self.model}")), dtype=float)
        out = distributed.gather(out)
        missing = int(np.isnan(out).sum())
        if missing:
            self.stats["no_verdict"] += missing
            print(f"evaluate: the http judge gave no verdict on {missing} of {len(out)} pairs (budget "
                  f"{self.stats['requests']}/{self.budget} requests used; last error: {self.stats['last_error']})")
        return out
