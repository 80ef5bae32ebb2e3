"""The README's screenshot of the playground page: serve a run, type a prompt, let it stream, capture.

    python bench/playground_screenshot.py runs/demo/run --out docs/playground.png

Needs /usr/bin/chromium (Debian: apt-get install -y chromium); drives it as tests/test_serve_page.py does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    from headless_chromium import Browser
    from serve_live import live_server

    from budgetlm.serve.app import create_app
    from budgetlm.serve.engine import Engine

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--prompt", default="ROMEO:")
    p.add_argument("--max-tokens", type=int, default=120)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--out", default=str(ROOT / "docs" / "playground.png"))
    args = p.parse_args()
    with live_server(create_app(Engine(args.run))) as url:
        browser = Browser(width=900, height=640)
        try:
            browser.goto(url + "/")
            browser.wait_for("document.getElementById('model').textContent.includes('(')")
            for field, value in (("prompt", args.prompt), ("temperature", args.temperature), ("max_tokens", args.max_tokens)):
                browser.evaluate(f"document.getElementById('{field}').value = {json.dumps(str(value))}")
            browser.evaluate("document.getElementById('go').click()")
            browser.wait_for("document.getElementById('output').dataset.done === '1'", timeout=120)
            browser.screenshot(args.out)
        finally:
            browser.close()
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
