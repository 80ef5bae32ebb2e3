"""Fine-tuned directories behind `budgetlm serve`: /v1/classify and /v1/tag give what `budgetlm predict` gives."""

import random

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from serve_live import live_server  # noqa: E402
from test_finetune_runs import make_tiny_run  # noqa: E402

from budgetlm.cli import main  # noqa: E402
from budgetlm.finetune.predict import load_finetuned, predict_examples  # noqa: E402
from budgetlm.finetune.tasks import Example  # noqa: E402
from budgetlm.serve.app import create_app  # noqa: E402
from budgetlm.serve.engine import Engine  # noqa: E402

TEXTS = ["the film was great", "the plot was boring", "a fun movie"]
SENTENCE = "the dog sat on a mat"


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_ft")
    run = make_tiny_run(d / "run")
    r = random.Random(0)
    words = {"pos": ["great", "fun", "fine"], "neg": ["boring", "dull", "awful"]}
    rows = [(lab, f"the film was {r.choice(words[lab])}") for lab in ["pos", "neg"] * 12]
    (d / "cls.csv").write_text("".join(f"{a},{b}\n" for a, b in rows))
    ner = {"the": "O", "a": "O", "dog": "B-ANIMAL", "cat": "B-ANIMAL", "mat": "B-THING", "sat": "O", "on": "O"}
    sents = [["the", r.choice(["dog", "cat"]), "sat", "on", "a", "mat"] for _ in range(16)]
    (d / "ner.conll").write_text("".join("".join(f"{w} {ner[w]}\n" for w in s) + "\n" for s in sents))
    out = {}
    for name, task, method in (("cls.csv", "classify", "full"), ("ner.conll", "tag", "lora")):
        out[task] = d / task
        args = ["finetune", str(run), "--train", str(d / name), "--task", task, "--method", method, "--out", str(out[task])]
        assert main([*args, "--epochs", "1", "--batch-size", "8"]) == 0
    return out


def test_classify_and_tag_match_predict(finetuned):
    model, tok, space, meta = load_finetuned(finetuned["classify"])
    expected = predict_examples(model, tok, [Example(text=t) for t in TEXTS], space, meta["max_len"])
    with live_server(create_app(Engine(finetuned["classify"]))) as url:
        r = httpx.post(url + "/v1/classify", json={"input": TEXTS}).json()
        assert [d["label"] for d in r["data"]] == expected
        for d in r["data"]:
            assert set(d["probabilities"]) == {"pos", "neg"} and abs(sum(d["probabilities"].values()) - 1) < 1e-5
            assert d["probabilities"][d["label"]] == max(d["probabilities"].values())
        emb = httpx.post(url + "/v1/embeddings", json={"input": "a fun movie"}).json()
        assert len(emb["data"][0]["embedding"]) == 64
        r = httpx.post(url + "/v1/completions", json={"prompt": "the"})
        assert r.status_code == 400 and "/v1/classify" in r.json()["error"]["message"]
        assert httpx.post(url + "/v1/tag", json={"input": "a"}).status_code == 400

    model, tok, space, meta = load_finetuned(finetuned["tag"])
    expected = predict_examples(model, tok, [Example(text=SENTENCE.split())], space, meta["max_len"])[0]
    with live_server(create_app(Engine(finetuned["tag"]))) as url:
        r = httpx.post(url + "/v1/tag", json={"input": [SENTENCE]}).json()["data"][0]
    assert r["words"] == SENTENCE.split() and r["tags"] == expected
    assert all(r["tags"][s["start"]].startswith("B-") or r["tags"][s["start"]].startswith("I-") for s in r["spans"])
