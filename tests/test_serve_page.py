"""The playground page in headless Chromium: typed prompt in, streamed tokens out, as the API gives them;
a text classified (label and a bar per class) or tagged by a fine-tuned model, as the API answers."""

import os

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from headless_chromium import CHROMIUM, Browser  # noqa: E402
from serve_live import live_server  # noqa: E402
from test_finetune_runs import make_tiny_run  # noqa: E402
from test_serve_finetuned import finetuned  # noqa: E402, F401 (a fixture)

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


@pytest.mark.parametrize("task", ["classify", "tag"])
def test_the_page_classifies_and_tags_with_a_finetuned_model(finetuned, task):  # noqa: F811 (a fixture)
    text = "the film was great" if task == "classify" else "the dog sat on a mat"
    with live_server(create_app(Engine(finetuned[task]))) as url:
        answer = httpx.post(url + f"/v1/{task}", json={"input": [text]}).json()["data"][0]
        browser = Browser()
        try:
            browser.goto(url + "/")
            # the page picks its mode from what the model is
            browser.wait_for(f"document.getElementById('model').textContent.includes('{task}')")
            mode = browser.evaluate("document.getElementById('mode').value")
            browser.evaluate(f"document.getElementById('prompt').value = {text!r}")
            browser.evaluate("document.getElementById('go').click()")
            browser.wait_for("document.getElementById('output').dataset.done === '1'")
            shown = browser.evaluate("document.getElementById('output').innerText")
            rows = browser.evaluate("[...document.querySelectorAll('#output tr')].map(r => r.cells[0].textContent + '=' + r.cells[2].textContent)")
        finally:
            browser.close()
    assert mode == task
    if task == "classify":
        assert shown.startswith(f"label: {answer['label']}")
        probabilities = sorted(answer["probabilities"].items(), key=lambda kv: -kv[1])
        assert rows == [f"{label}={p:.3f}" for label, p in probabilities]  # one bar per label, most likely first
    else:
        assert shown.strip() == " ".join(w if t == "O" else f"{w}/{t}" for w, t in zip(answer["words"], answer["tags"]))  # word/TAG, O left bare
