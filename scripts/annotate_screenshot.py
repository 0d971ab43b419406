"""The picture of the annotation page in docs/feedback.md:
`python scripts/annotate_screenshot.py [--out docs/annotate.png]`.

Serves the demo's held-out on-policy pairs (data/demo/onpolicy_eval.jsonl: the SFT model's best and worst of 4
sampled answers to each prompt) as candidates, in a scratch folder, opens the page in headless Chromium
(Debian: chromium + chromium-driver; pip: selenium), makes two judgements on the first item and saves the page.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs/annotate.png"))
    args = p.parse_args()

    from selenium import webdriver
    from selenium.webdriver.common.action_chains import ActionChains

    from llmft.annotate.items import read_items
    from llmft.annotate.server import App, make_server
    from llmft.annotate.store import Store

    rows = [json.loads(x) for x in (ROOT / "data/demo/onpolicy_eval.jsonl").read_text().splitlines()]
    with tempfile.TemporaryDirectory() as tmp:
        cands = Path(tmp) / "cands.jsonl"
        cands.write_text("".join(json.dumps({"id": str(i + 1), "prompt": r["prompt"],
                                             "candidates": [r["chosen"], r["rejected"]]}) + "\n"
                                 for i, r in enumerate(rows)))
        items = read_items(cands)
        server = make_server(App(items, Store(Path(tmp) / "ann.jsonl", items), "feedback", None, "alice", True),
                             "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        opts = webdriver.ChromeOptions()
        opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,760",
                     "--hide-scrollbars"):
            opts.add_argument(flag)
        driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(shutil.which("chromedriver")))
        try:
            driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
            time.sleep(1)
            ActionChains(driver).send_keys("4").perform()  # rate the first answer 4
            time.sleep(0.5)
            driver.find_element("id", "best-0").click()
            time.sleep(0.5)
            driver.save_screenshot(args.out)
        finally:
            driver.quit()
            server.shutdown()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
