"""label.py's page in a real headless browser: Debian's Chromium driven through Selenium labels pairs with the
keyboard, comes back after the browser is closed, and shows a post full of markup as plain text. Skipped, saying
why, where Chromium, ChromeDriver or Selenium is missing (.ci/run installs all three)."""
import json
import os
import shutil
import time

import pytest

import data
import label
from support.label_server import make_server, serve_in_thread

REQUIRED = os.environ.get("TLDR_RLHF_REQUIRE_BROWSER") == "1"  # .ci/run sets it: there a skip would hide a break
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    MISSING = "" if CHROMIUM and CHROMEDRIVER else ("needs chromium and chromedriver on PATH (Debian: apt-get "
                                                    "install chromium chromium-driver)")
except ImportError:
    MISSING = "needs selenium (pip install selenium)"
if MISSING and REQUIRED:
    raise RuntimeError(f"TLDR_RLHF_REQUIRE_BROWSER=1, but the browser test {MISSING}")
pytestmark = pytest.mark.skipif(bool(MISSING), reason=MISSING or "-")

HOSTILE = 'Help <img src=x onerror="window.pwned=1"><script>window.pwned=2</script> &amp; <b>bold</b>\nline two'


def browser(profile):
    """A headless Chromium, offline (no background connections), with its profile (local storage) in a folder."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.add_argument(f"--user-data-dir={profile}")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,900"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def wait_for(driver, condition, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out; the page says: {driver.find_element(By.TAG_NAME, 'body').text[:500]}")


@pytest.fixture
def server(tmp_path):
    """A label server on three Reddit-style pairs (relabelling a file we write), the first post full of markup."""
    comps = []
    for i, post in enumerate([HOSTILE, "Second post.", "Third post."]):
        rec = dict(id=f"t3_test{i}", post=post, title=f"<i>title {i}</i>", subreddit="test", summary="s")
        comps.append(data.comparison_record(rec, [("sft", f" left {i} <u>u</u>"), ("ref", f" right {i}")], 0, "orig",
                                            "valid2", "given", 3))
    data.write_jsonl(tmp_path / "given.json", comps)
    args = label.parse_args(["--relabel", str(tmp_path / "given.json"), "--out", str(tmp_path / "labels.json")])
    labels = label.Labels(args.out, label.load_or_make_pairs(args), args.batch, args.seed)
    srv = make_server(labels, "127.0.0.1", 0, quiet=True)
    serve_in_thread(srv)
    yield srv, labels, tmp_path / "labels.json"
    srv.shutdown()
    srv.server_close()


def test_a_person_labels_with_the_keyboard_and_comes_back_where_they_were(server, tmp_path):
    srv, labels, out = server
    driver = browser(tmp_path / "profile")
    try:
        driver.get(srv.url)
        body = lambda: driver.find_element(By.TAG_NAME, "body")  # noqa: E731
        text_of = lambda el_id: driver.find_element(By.ID, el_id).text  # noqa: E731
        field = wait_for(driver, lambda: driver.find_element(By.ID, "worker-input").is_displayed()
                         and driver.find_element(By.ID, "worker-input"))
        field.send_keys("tester", Keys.ENTER)
        wait_for(driver, lambda: text_of("progress") == "done 0 / 3")

        # the markup of the post, its title and the summaries shows as text, and none of it runs
        post = driver.find_element(By.ID, "post")
        assert post.get_property("textContent") == HOSTILE
        assert post.find_elements(By.CSS_SELECTOR, "*") == []
        assert driver.execute_script("return window.pwned") is None
        assert text_of("title") == "<i>title 0</i>" and "<u>u</u>" in text_of("summary-0") + text_of("summary-1")
        shown = [[text_of("summary-0"), text_of("summary-1")]]

        # pair 1: the keyboard alone (2 = left better), then Enter
        body().send_keys("2", Keys.ENTER)
        wait_for(driver, lambda: text_of("progress") == "done 1 / 3")
        shown.append([text_of("summary-0"), text_of("summary-1")])

        # pair 2: 5 is refused, an axis rating and a note (digits typed in it do not move the scale), 8, Enter
        body().send_keys("5")
        assert "no 5" in text_of("message")
        rating = driver.find_element(By.CSS_SELECTOR, 'input[name="axis-1-accuracy"][value="6"]')
        rating.click()
        rating.send_keys(Keys.TAB)  # the keyboard moves on from a rating (focus is not trapped there)
        assert driver.execute_script("return document.activeElement") != rating
        note = driver.find_element(By.ID, "note-0")
        note.send_keys("misses 3 facts", Keys.ESCAPE)
        assert driver.find_elements(By.CSS_SELECTOR, "#scale button.chosen") == []  # the 3 went into the note
        body().send_keys("8", Keys.ENTER)
        wait_for(driver, lambda: text_of("progress") == "done 2 / 3")
        assert driver.find_element(By.ID, "note-0").get_property("value") == ""  # a clean form for the next pair
    finally:
        driver.quit()

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(x["choice"], x["extra"]["confidence"], x["worker"]) for x in lines] == [(0, 2, "tester"),
                                                                                      (1, 8, "tester")]
    for line, seen in zip(lines, shown):  # the file keeps the order the person saw (left = summaries[0])
        assert [s["text"].strip() for s in line["summaries"]] == [t.strip() for t in seen]
    assert lines[1]["summaries"][0]["note"] == "misses 3 facts" and lines[1]["summaries"][1]["axes"] == {"accuracy": 6}
    assert lines[0]["info"]["post"] == HOSTILE

    # the browser was closed; the same person opens the same address again: the page remembers who they are
    driver = browser(tmp_path / "profile")
    try:
        driver.get(srv.url)
        wait_for(driver, lambda: driver.find_element(By.ID, "progress").text == "done 2 / 3")
        assert driver.find_element(By.ID, "title").text == "<i>title 2</i>"
        # meanwhile the same person labels this pair in another tab: the page moves on instead of failing forever
        labels.judge(dict(worker="tester", pair=labels.state("tester")["pair"]["key"], confidence=9))
        driver.find_element(By.TAG_NAME, "body").send_keys("2", Keys.ENTER)
        wait_for(driver, lambda: driver.find_element(By.ID, "finished").is_displayed())
        assert "labelled already" in driver.find_element(By.ID, "message").text
    finally:
        driver.quit()
    assert len(out.read_text().splitlines()) == 3 and labels.state("tester")["done"] == 3
