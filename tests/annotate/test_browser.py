"""The feedback loop in a real browser (headless Chromium through Selenium): generate candidates with two seeds,
annotate 20 items by mouse and keyboard — rate, pick, rank, edit, critique, tie, skip — kill the server
mid-session, restart it, finish, export, train dpo and kto for a step on the result, then compare the trained
model with the base blind and read the human win rate. Skipped, with the reason, where no Chromium, chromedriver
or selenium is installed (scripts/test.sh installs them with apt-get and pip where it can)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.helpers.cli import free_port, llmft

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
PROMPTS = ROOT / "data/demo/sft_eval.jsonl"

pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no Chromium and chromedriver on PATH (Debian: "
                                                                  "apt-get install chromium chromium-driver)")


class Server:
    """`llmft annotate serve` as its own process, killed with SIGKILL to test that nothing is lost."""

    def __init__(self, *args: object):
        self.args, self.port = [str(a) for a in args], free_port()
        self.url = f"http://127.0.0.1:{self.port}/"

    def start(self) -> Server:
        cmd = [sys.executable, "-m", "llmft", "annotate", "serve", *self.args, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(200):
            try:
                urllib.request.urlopen(self.url, timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise AssertionError(self.proc.stdout.read()) from None
                time.sleep(0.1)
        raise AssertionError("the server did not answer")

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
    yield driver
    driver.quit()


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def act(driver, annotations: Path, do, saved: int = 1) -> None:
    """Do something in the page and wait until `saved` more judgements are on disk."""
    from selenium.webdriver.support.ui import WebDriverWait

    before = lines(annotations)
    do()
    WebDriverWait(driver, 10).until(lambda _: lines(annotations) >= before + saved,
                                    message=f"no judgement saved; page says {status(driver)!r}")
    time.sleep(0.05)  # the page re-renders after the answer


def status(driver) -> str:
    return driver.find_element("id", "status").text


def keys(driver, text: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(text).perform()


def click(driver, element_id: str) -> None:
    driver.find_element("id", element_id).click()


def annotate_item(driver, ann: Path, n: int) -> None:
    """Item n (1-based) of the session: each kind of judgement somewhere, by mouse and keyboard."""
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    if n == 3:  # edit the first answer shown
        click(driver, "edit-0")
        box = driver.find_element("id", "edit-text-0")
        box.clear()
        box.send_keys("A short, clear answer.")
        act(driver, ann, lambda: click(driver, "save-edit-0"))
    if n == 4:  # a critique of the focused answer, by key: c, type, leave the box
        keys(driver, "c")
        keys(driver, "It never says why.")
        act(driver, ann, lambda: click(driver, "prompt"))
    if n == 10:  # a critique of the item as a whole, by mouse
        click(driver, "item-critique")
        keys(driver, "Both answers are off topic.")
        act(driver, ann, lambda: click(driver, "prompt"))
    if n == 5:  # a full ranking with the selects
        k = len(driver.find_elements("css selector", ".cand"))
        for pos in range(k):
            Select(driver.find_element("id", f"rank-{pos}")).select_by_value(str(k - pos))
        act(driver, ann, lambda: click(driver, "save-rank"))
    if n == 6:
        return act(driver, ann, lambda: keys(driver, "t"))  # tie: finishes the item
    if n == 7:
        return act(driver, ann, lambda: keys(driver, "s"))  # skip
    act(driver, ann, lambda: keys(driver, str(1 + n % 5)))  # rate the focused answer
    act(driver, ann, lambda: keys(driver, "j" + str(5 - n % 5)))  # the next one, rated otherwise
    if n % 2:
        act(driver, ann, lambda: click(driver, "best-1"))  # a pick by mouse
    else:
        act(driver, ann, lambda: keys(driver, "b"))  # ... and by key (the focused answer)
    act(driver, ann, lambda: keys(driver, Keys.ENTER))  # done, next


def test_the_feedback_loop_end_to_end_in_a_browser(browser, tiny_model_dir, tmp_path, capsys, monkeypatch,
                                                   write_config):
    from llmft.config import load_config
    from llmft.stages import dpo, kto

    gens = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}.jsonl"
        code, _, err = llmft(capsys, monkeypatch, "generate", tiny_model_dir, "--prompts", PROMPTS, "--out", out,
                             "--limit", "20", "--seed", str(seed), "--temperature", "1.0", "--max-new-tokens", "12")
        assert code == 0, err
        gens.append(out)
    cands, ann = tmp_path / "cands.jsonl", tmp_path / "cands.annotations.jsonl"
    code, _, err = llmft(capsys, monkeypatch, "annotate", "candidates", *gens, "--out", cands)
    assert code == 0, err
    assert len(cands.read_text().splitlines()) == 20

    server = Server(cands, "--annotator", "alice").start()
    browser.get(server.url)
    assert browser.find_element("id", "next").is_displayed() and not browser.find_element("id", "left").is_displayed()
    for n in range(1, 9):
        assert browser.find_element("id", "title").text == f"Item {n} of 20"
        annotate_item(browser, ann, n)
    server.kill()  # mid-session: every judgement made so far is on disk
    saved, before_kill = lines(ann), ann.read_text().splitlines()
    server.start()
    browser.get(server.url)  # the page reopened: it continues where alice stopped
    assert browser.find_element("id", "progress").text == "8 / 20 done"
    assert browser.find_element("id", "title").text == "Item 9 of 20" and lines(ann) == saved
    for n in range(9, 21):
        annotate_item(browser, ann, n)
    assert browser.find_element("id", "empty").is_displayed()
    browser.save_screenshot(str(tmp_path / "done.png"))
    server.kill()

    for target in ("dpo", "kto", "critiques"):
        code, stdout, err = llmft(capsys, monkeypatch, "annotate", "export", cands, "--to", target,
                                  "--out", tmp_path / f"{target}.jsonl")
        assert code == 0, err
    judgements = [json.loads(x) for x in ann.read_text().splitlines()]
    assert {j["action"] for j in judgements} == {"rate", "pick", "rank", "edit", "critique", "tie", "skip", "done"}
    critiques = [json.loads(x) for x in (tmp_path / "critiques.jsonl").read_text().splitlines()]
    assert [r["critique"] for r in critiques] == ["It never says why."] + ["Both answers are off topic."] * 2
    assert ann.read_text().splitlines()[:saved] == before_kill  # what was on disk at the kill is there, unchanged
    finished = {j["item"] for j in judgements if j["action"] in ("done", "tie", "skip")}
    assert len(finished) == 20 and len({(j["item"], j["time"]) for j in judgements}) == len(judgements)
    pairs = [json.loads(x) for x in (tmp_path / "dpo.jsonl").read_text().splitlines()]
    assert len(pairs) >= 15 and any(p["chosen"] == "A short, clear answer." for p in pairs)
    runs = {}
    for stage, module, extra in (("dpo", dpo, {}), ("kto", kto, {"train__batch_size": 4})):
        extra["data__max_length"] = 1024  # the tiny tokenizer spends many tokens on the demo prompts
        cfg = load_config(stage, write_config(tiny_model_dir, tmp_path / f"{stage}.jsonl", train__max_steps=1,
                                              output_dir=str(tmp_path / f"run-{stage}"), **extra))
        module.run(cfg)
        runs[stage] = tmp_path / f"run-{stage}"
        assert (runs[stage] / "metrics.jsonl").exists()

    # blind side by side: the base model against the DPO run, 6 prompts, sides shuffled per item
    outs = []
    for name, model in (("base", tiny_model_dir), ("dpo", runs["dpo"])):
        out = tmp_path / f"{name}.jsonl"
        code, _, err = llmft(capsys, monkeypatch, "generate", model, "--prompts", PROMPTS, "--out", out,
                             "--limit", "6", "--seed", "3", "--temperature", "1.0", "--max-new-tokens", "12")
        assert code == 0, err
        outs.append(out)
    pairs_file, blind = tmp_path / "pairs.jsonl", tmp_path / "pairs.annotations.jsonl"
    llmft(capsys, monkeypatch, "annotate", "candidates", *outs, "--out", pairs_file)
    server = Server(pairs_file, "--mode", "compare", "--annotator", "bob").start()
    browser.get(server.url)
    assert browser.find_element("id", "left").is_displayed() and not browser.find_element("id", "next").is_displayed()
    assert not browser.find_elements("id", "rate-0-1")  # blind: nothing but the choice
    from selenium.webdriver.common.keys import Keys

    count = len(pairs_file.read_text().splitlines())
    for i in range(count):
        act(browser, blind, lambda i=i: keys(browser, [Keys.ARROW_LEFT, Keys.ARROW_RIGHT, Keys.ARROW_DOWN][i % 3]))
    assert browser.find_element("id", "empty").is_displayed()
    server.kill()
    code, stdout, err = llmft(capsys, monkeypatch, "annotate", "report", pairs_file, "--out", tmp_path / "r.json")
    assert code == 0, err
    rate = json.loads((tmp_path / "r.json").read_text())["win_rates"]["dpo vs base"]
    assert rate["n"] == count and 0 <= rate["ci95"][0] <= rate["win_rate"] <= rate["ci95"][1] <= 1
    assert "blind comparison dpo vs base: win rate" in stdout
