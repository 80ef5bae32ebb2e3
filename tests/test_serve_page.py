"""The playground page in headless Chromium: typed prompt in, streamed tokens out, as the API gives them."""

import os

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from headless_chromium import CHROMIUM, Browser  # noqa: E402
from serve_live import live_server  # noqa: E402
from test_finetune_runs import make_tiny_run  # noqa: E402

from budgetlm.serve.app import create_app  # noqa: E402
from budgetlm.serve.engine import Engine  # noqa: E402

pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"no {CHROMIUM} (Debian: apt-get install -y chromium)")


def test_the_page_streams_the_completion(tmp_path):
    engine = Engine(make_tiny_run(tmp_path / "run"))
    with live_server(create_app(engine)) as url:
        expected = httpx.post(url + "/v1/completions", json={"prompt": "the film", "max_tokens": 12, "temperature": 0}).json()["choices"][0]["text"]
        browser = Browser()
        try:
            browser.goto(url + "/")
            browser.wait_for("document.getElementById('model').textContent.includes('causal')")
            browser.evaluate("document.getElementById('prompt').value = 'the film'")
            browser.evaluate("document.getElementById('temperature').value = '0'")
            browser.evaluate("document.getElementById('max_tokens').value = '12'")
            browser.evaluate("document.getElementById('go').click()")
            browser.wait_for("document.getElementById('output').dataset.done === '1'")
            shown = browser.evaluate("document.getElementById('output').textContent")
            status = browser.evaluate("document.getElementById('status').textContent")
            chunks = browser.evaluate("document.querySelectorAll('#output span:not(.prompt)').length")
        finally:
            browser.close()
    assert shown == "the film" + expected
    assert status.startswith("done") and chunks > 1  # it arrived in pieces, not at once
