"""
Fetching OpenAI's released data into data/tldr/: the filtered TL;DR splits, every comparison batch, the axis
evaluations and CNN/DM test articles, from OpenAI's public summarize-from-feedback blob (BASE_URL). A finished file is
skipped, a partial one resumed, and a file gets its final name only after its checks pass.

    python -m support.openai_data                      # -> data/tldr/ (--help: the options)
"""
import argparse
import hashlib
import json
import re
import sys
import urllib.request
from pathlib import Path

from tqdm import tqdm

import data
from support.files import download as fetch

BASE_URL = "https://openaipublic.blob.core.windows.net/summarize-from-feedback/"
TLDR_LINES = dict(train=116722, valid=6447, test=6553)
COMPARISON_FILES = [f"batch{i}" for i in range(3, 21)] + ["batch22", "batch0_cnndm", "cnndm0", "cnndm2",
                                                          "edit_b2_eval_test"]
AXIS_FILES = ["cnndm1", "cnndm3", "cnndm4", "tldraxis1", "tldraxis2"]
KNOWN_SHA256 = {  # of the published files, to catch a changed or damaged download
    "batch18": "5008e223e287b4c38e434e270cf77301993adba70e1f87362f35fb928f83863a",
    "cnndm0": "be936926b85b8d42d708529bb4fae2470918cb0bd7d8d3eb3c7a4b4cb986225b",
    "edit_b2_eval_test": "6fa83abe0e2ecbae78644962af03c91bbf896db8ecaaf3ab672b8283a96c16c6",
}


def _check_file(path, remote):
    """What can be checked without the originals: line counts, JSON that the readers accept, known hashes."""
    stem = Path(remote).stem
    if remote.startswith("datasets/tldr_3_filtered/"):
        n = len(data.read_tldr(path))
        if n != TLDR_LINES[stem]:
            raise data.DataError(f"{path}: {n} records, expected {TLDR_LINES[stem]}")
    elif remote.startswith("dataset/comparisons/"):
        data.read_comparisons(path)
    elif remote.startswith("dataset/axis_evals/"):
        data.read_axis_evals(path)
    if stem in KNOWN_SHA256 and hashlib.sha256(Path(path).read_bytes()).hexdigest() != KNOWN_SHA256[stem]:
        raise data.DataError(f"{path}: sha256 differs from the published file")


def download(data_dir=None, base_url=BASE_URL, cnndm_n=1000, timeout=10.0):
    """Fetch the filtered TL;DR splits, all comparison batches, the axis evals and `cnndm_n` CNN/DM test articles
    (0 = all 11,490) into data_dir. A finished file is skipped, a partial one resumed; a file gets its final name only
    after its checks pass. Without network it fails within `timeout` seconds, saying what to place where."""
    data_dir = Path(data_dir or data.TASKS["tldr"]["data_dir"])
    plan = [(f"datasets/tldr_3_filtered/{s}.jsonl", f"{s}.jsonl") for s in TLDR_LINES]
    plan += [(f"dataset/comparisons/{b}.json", f"comparisons/{b}.json") for b in COMPARISON_FILES]
    plan += [(f"dataset/axis_evals/{b}.json", f"axis_evals/{b}.json") for b in AXIS_FILES]
    plan += [("datasets/cnndm/url_lists/all_test.txt", "cnndm/all_test.txt"), ("datasets/cnndm/titles.json",
                                                                              "cnndm/titles.json")]
    base_url = base_url.rstrip("/") + "/"
    try:
        urllib.request.urlopen(urllib.request.Request(base_url + plan[0][0], method="HEAD"), timeout=timeout).close()
    except (OSError, ValueError) as e:  # URLError, refused, timeout
        where = "\n".join(f"  {base_url}{remote}\n    -> {data_dir / local}" for remote, local in plan)
        raise data.DataError(f"cannot reach {base_url} ({e}). Download these files elsewhere and place them as shown; "
                        f"every reader also takes a local path. CNN/DM stories: {base_url}datasets/cnndm/cache_test/"
                        f"{{site}}/stories/{{sha1(url)}}.story -> {data_dir}/cnndm/stories/\n{where}") from e
    for remote, local in plan:
        dest = data_dir / local
        if dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        fetch(base_url + remote, dest, timeout, check=lambda part: _check_file(part, remote))
    urls = [u.strip() for u in (data_dir / "cnndm/all_test.txt").read_text().split("\n") if u.strip()]
    titles = json.loads((data_dir / "cnndm/titles.json").read_text())
    records = []
    (data_dir / "cnndm/stories").mkdir(exist_ok=True)
    for url in tqdm(urls[:cnndm_n or None], desc="cnndm stories"):
        dailymail = any(s in url for s in ("dailymail.co.uk", "mailonsunday.ie", "lib.store.yahoo.net"))
        doc_id, site = hashlib.sha1(url.encode()).hexdigest(), "dailymail" if dailymail else "cnn"  # as OpenAI's code
        dest = data_dir / "cnndm/stories" / f"{doc_id}.story"
        if not dest.exists():
            fetch(f"{base_url}datasets/cnndm/cache_test/{site}/stories/{doc_id}.story", dest, timeout, progress=False)
        article, reference = parse_story(dest.read_text(encoding="utf-8"))
        records.append(dict(article=article, reference=reference, id=doc_id, site=site, title=titles.get(doc_id)))
    data.write_jsonl(data_dir / data.TASKS["tldr"]["files"]["transfer"], records)
    print(f"data: all files in {data_dir}")


def parse_story(text):
    """A DMQA .story file -> (article, reference), following the processing of OpenAI's released cnndm.py (article
    lines before the first @highlight, the highlights joined as the reference), without ftfy's text repair (not a
    dependency here); the Daily Mail header pattern is our approximation of theirs."""
    lines = [line.strip() for line in text.replace("\xa0", " ").split("\n")]
    cut = lines.index("@highlight") if "@highlight" in lines else len(lines)
    article = "\n\n".join(line for line in lines[:cut] if line)
    article = re.sub(r"^\(CNN\)\s*(--)?\s*", "", article)
    article = re.sub(r"^.{0,300}?UPDATED:[\s.]*\d\d:\d\d \w+, \d+ \w+ \d{4}[\s.]*", "", article, flags=re.S)
    article = article.replace("\u2019", "'").replace("\u2018", "'").strip()
    highlights = []
    for line in lines[cut:]:
        line = line.replace("NEW: ", "")
        if not line or line == "@highlight" or line.startswith(("READ: ", "for all the latest ")):
            continue
        line = re.split(r"CLICK HERE|Click here|click here", line)[0].strip()
        if line and not line.endswith((".", "!", "?", "...", "'", "`", '"', "\u2019", "\u201d", ")")):
            line += "."  # fix_missing_period
        if line:
            highlights.append(line)
    return article, " ".join(highlights)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=data.TASKS["tldr"]["data_dir"], help="where to put the files")
    parser.add_argument("--base-url", default=BASE_URL, help="mirror of OpenAI's summarize-from-feedback blob")
    parser.add_argument("--cnndm-n", type=int, default=1000, help="CNN/DM test articles for transfer (0 = all 11,490)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before a connection attempt fails")
    args = parser.parse_args(argv)
    try:
        download(args.data_dir, args.base_url, args.cnndm_n, args.timeout)
    except (data.DataError, OSError) as e:  # OSError: no network (ConnectionError), a folder not writable
        sys.exit(f"openai_data: error: {e}")


if __name__ == "__main__":
    main()
