"""`budgetlm serve` over HTTP: the official openai client, streaming, errors and limits, keys, metrics.

A tiny random run (built in a few ms) behind a real uvicorn server on a loopback port."""

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_live import live_server  # noqa: E402
from test_finetune_runs import make_tiny_run  # noqa: E402

from budgetlm.serve.app import ServeOptions, create_app  # noqa: E402
from budgetlm.serve.engine import Engine, bio_spans  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("serve") / "run")


@pytest.fixture(scope="module")
def engine(run_dir):
    return Engine(run_dir)


@pytest.fixture(scope="module")
def server(engine):
    options = ServeOptions(max_batch=8, max_tokens=64, max_n=4, max_body_bytes=4096, max_inputs=8)
    with live_server(create_app(engine, options)) as url:
        yield url


def client(url, key="none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_openai_client_completions(server, engine):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [engine.model_id]
    r = c.completions.create(model=engine.model_id, prompt=["the film", "a dog"], max_tokens=6, temperature=0, n=2, logprobs=2)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: both choices agree
    assert r.usage.prompt_tokens == 2 * (len(engine.tokenizer.encode("the film")) + len(engine.tokenizer.encode("a dog")))
    for ch in r.choices:
        assert ch.finish_reason in ("length", "stop") and len(ch.logprobs.tokens) <= 6
        assert all(len(top) == 2 and max(top.values()) >= lp - 1e-5 for top, lp in zip(ch.logprobs.top_logprobs, ch.logprobs.token_logprobs))
    # the same text as `budgetlm generate`'s sampler, with seeds
    a = c.completions.create(model="x", prompt="the", max_tokens=12, temperature=1.0, seed=7)
    b = c.completions.create(model="x", prompt="the", max_tokens=12, temperature=1.0, seed=7)
    assert a.choices[0].text == b.choices[0].text


def test_openai_client_streams_the_same_text(server):
    c = client(server)
    whole = c.completions.create(model="m", prompt="the cat sat", max_tokens=10, temperature=0)
    chunks = list(
        c.completions.create(model="m", prompt="the cat sat", max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason

    chat = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 8
    streamed = list(c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0, stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed).strip() == chat.choices[0].message.content
    assert streamed[-1].choices[0].finish_reason == chat.choices[0].finish_reason

    emb = c.embeddings.create(model="m", input=["the film", "a dog"])  # base64 on the wire, decoded by the client
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 64
    assert abs(sum(x * x for x in emb.data[0].embedding) - 1) < 1e-4


def status_and_error(response):
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"]
    return response.status_code, body["error"]["message"]


@pytest.mark.parametrize(
    "body, status, says",
    [
        (b'{"prompt": "a", ', 400, "not valid JSON"),
        (b"[1, 2]", 422, ""),
        ({"prompt": 5}, 422, "prompt"),
        ({"prompt": "a", "max_tokens": "5"}, 422, "max_tokens"),
        ({"prompt": "a", "max_token": 5}, 422, "unknown field 'max_token'"),
        ({"prompt": "a", "max_tokens": 65}, 422, "max_tokens"),
        ({"prompt": "a", "n": 5}, 422, "n: 5"),
        ({"prompt": "a", "temperature": -1}, 422, "temperature"),
        ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
        ({"prompt": "the " * 100}, 413, "at most 64"),
        ({"prompt": "x" * 5000}, 413, "larger than 4096 bytes"),
        ({}, 422, "'prompt' is required"),
    ],
)
def test_bad_requests_get_4xx_json(server, body, status, says):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server + "/v1/completions", content=content, headers={"content-type": "application/json"})
    got, message = status_and_error(r)
    assert got == status and says in message, message


@pytest.mark.parametrize(
    "route, content, content_type",
    [
        ("/v1/completions", b"\xff\xfe{", "application/json"),
        ("/v1/completions", b"null", "application/json"),
        ("/v1/completions", b'"prompt"', "application/json"),
        ("/v1/completions", b'{"prompt": "a"}', "text/plain"),
        ("/v1/completions", b'{"prompt": {"a": 1}}', "application/json"),
        ("/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "hi"}]}', "application/json"),
        ("/v1/chat/completions", b'{"messages": "hi"}', "application/json"),
        ("/v1/chat/completions", b'{"messages": []}', "application/json"),
        ("/v1/embeddings", b'{"input": [1, 2]}', "application/json"),
        ("/v1/embeddings", b'{"input": "a", "encoding_format": "hex"}', "application/json"),
        ("/v1/completions", b'{"prompt": "a", "logit_bias": {"5": 1.0}}', "application/json"),
        ("/v1/completions", b'{"prompt": "a", "max_tokens": 1e400}', "application/json"),
    ],
)
def test_odd_bodies_are_4xx_never_5xx(server, route, content, content_type):
    r = httpx.post(server + route, content=content, headers={"content-type": content_type})
    status, _ = status_and_error(r)
    assert 400 <= status < 500


def test_unknown_routes_and_tasks_the_model_lacks(server):
    assert status_and_error(httpx.get(server + "/v1/nothing"))[0] == 404
    status, message = status_and_error(httpx.post(server + "/v1/classify", json={"input": "a"}))
    assert status == 400 and "fine-tuned" in message
    assert httpx.get(server + "/health").json()["status"] == "ok"
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "<script>" in page.text


def test_a_client_that_disconnects_frees_its_slot(server):
    with httpx.stream("POST", server + "/v1/completions", json={"prompt": "the", "max_tokens": 64, "stream": True}) as r:
        next(r.iter_lines())  # it is running
    deadline = time.monotonic() + 20
    while httpx.get(server + "/health").json()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(server + "/health").json()["active"] == 0


def test_metrics_are_prometheus_text(server):
    httpx.post(server + "/v1/completions", json={"prompt": "the", "max_tokens": 2})
    httpx.post(server + "/v1/completions", json={"prompt": "the", "n": 99})
    text = httpx.get(server + "/metrics").text
    for needle in (
        'budgetlm_request_seconds_bucket{le="0.005",route="/v1/completions"}',
        "budgetlm_time_to_first_token_seconds_count",
        "budgetlm_tokens_generated_total",
        "budgetlm_active_requests",
        "budgetlm_queue_depth",
        "budgetlm_batch_size",
        'budgetlm_errors_total{status="422"}',
    ):
        assert needle in text, needle


def test_keys_rate_limits_and_the_queue_bound(engine):
    options = ServeOptions(max_batch=1, max_queue=1, rate_limit=60, rate_burst=3)
    busy = copy.copy(engine)
    busy.eos_id = None  # so the request holding the only slot cannot end early by sampling end-of-text
    app = create_app(busy, options, keys=["k-one", "k-two"])
    scheduler, step = app.state.scheduler, app.state.scheduler.step
    scheduler.step = lambda: (time.sleep(0.02), step())  # a slow model: the slot stays taken while the test looks
    with live_server(app) as url:
        assert status_and_error(httpx.get(url + "/v1/models"))[0] == 401
        assert status_and_error(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k-on"}))[0] == 401
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        assert httpx.get(url + "/health").status_code == 200  # public
        assert client(url, "k-one").models.list().data
        assert client(url, "k-one").models.list().data
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k-one"})
        assert r.status_code == 200
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k-one"})  # the 4th in a burst of 3
        assert status_and_error(r)[0] == 429 and int(r.headers["retry-after"]) >= 1

        # one slot, one queue place: a third concurrent request is turned away with 503
        auth = {"Authorization": "Bearer k-two"}
        with httpx.stream("POST", url + "/v1/completions", headers=auth, json={"prompt": "the", "max_tokens": 500, "stream": True}) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the response, which the server sees as a disconnect
            next(lines)
            waiter = threading.Thread(
                target=httpx.post, args=(url + "/v1/completions",), kwargs={"headers": auth, "json": {"prompt": "a", "max_tokens": 2}, "timeout": 60}
            )
            waiter.start()
            deadline = time.monotonic() + 20
            while httpx.get(url + "/health").json()["waiting"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            r = httpx.post(url + "/v1/completions", headers=auth, json={"prompt": "a", "max_tokens": 2})
            assert status_and_error(r)[0] == 503 and r.headers["retry-after"] == "1"
        waiter.join(60)


def test_bio_spans():
    words = "Ann Lee met Bob in New York".split()
    tags = ["B-PER", "I-PER", "O", "B-PER", "O", "B-LOC", "I-LOC"]
    assert bio_spans(words, tags) == [
        {"label": "PER", "start": 0, "end": 2, "text": "Ann Lee"},
        {"label": "PER", "start": 3, "end": 4, "text": "Bob"},
        {"label": "LOC", "start": 5, "end": 7, "text": "New York"},
    ]
    assert bio_spans(["a", "b"], ["I-X", "B-X"]) == [
        {"label": "X", "start": 0, "end": 1, "text": "a"},
        {"label": "X", "start": 1, "end": 2, "text": "b"},
    ]


def test_sigterm_finishes_in_flight_requests_then_exits(run_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "budgetlm", "serve", str(run_dir), "--port", "0", "--device", "cpu"],
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        line = proc.stderr.readline()
        assert "serving" in line, line
        url = line.split(" on ")[1].split()[0]
        with httpx.stream(
            "POST", url + "/v1/completions", json={"prompt": "the", "max_tokens": 40, "stream": True, "temperature": 0}, timeout=60
        ) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
