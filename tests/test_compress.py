"""`budgetlm compress`: every method's output loads through the run loader and evaluates; quantized
runs reload as the very tensors saved; pruning removes rows for real and, before recovery, computes
what the original computes with those units switched off; distillation trains a smaller student
whose loss falls; bad requests get one error line and exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from budgetlm.cli import main
from budgetlm.compress.distill import soft_target_loss
from budgetlm.compress.prune import Gates, PrunePlan, apply_plan, choose, gated, importance
from budgetlm.compress.quantize import is_quantized, quantize_model
from budgetlm.config import ModelConfig
from budgetlm.model import Transformer
from budgetlm.pretrain import pretrain, resolve_config
from budgetlm.run import load_run
from budgetlm.tracking import read_metrics

TINY = [
    "auto=false",
    "model.n_layer=3",
    "model.n_head=4",
    "model.n_embd=64",
    "model.seq_len=32",
    "train.batch_tokens=512",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_tokens=1024",
    "train.lr=3e-3",
    "train.warmup=0.1",
]


@pytest.fixture(scope="module")
def trained(prepared_bpe, tmp_path_factory):
    run = tmp_path_factory.mktemp("compress") / "run"
    pretrain(resolve_config(None, "steps:25", TINY, str(prepared_bpe)), run)
    return run


def compress(*args) -> int:
    return main(["compress", *map(str, args)])


def eval_json(run, capsys) -> dict:
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--tokens", "512"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def fails(capsys, args, match: str) -> None:
    capsys.readouterr()
    assert compress(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def batch(model: Transformer, B: int = 2, T: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, model.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# quantization


@pytest.mark.parametrize("method", ["int8", "int8-dyn"])
def test_quantized_run_reloads_as_saved_and_evaluates(trained, tmp_path, capsys, method):
    out = tmp_path / method
    assert compress(trained, "--method", method, "--out", out, "--json") == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["method"] == method and record["size_after_bytes"] < record["size_before_bytes"]
    loaded = load_run(out).model
    linears = [m for n, m in loaded.named_modules() if n.startswith("layers.") and isinstance(m, torch.nn.Linear)]
    assert linears and all(is_quantized(m.weight) for m in linears)  # not float weights re-quantized at load
    assert loaded.output.weight is loaded.tok_embeddings.weight  # the tied head stays tied (and float), stored once
    reference = quantize_model(load_run(trained).model, method, torch.device("cpu"))
    x = batch(reference)
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))
        float_logits = load_run(trained).model(x)
    assert not torch.equal(loaded(x), float_logits)  # it is quantized: not the float model's numbers
    before, after = eval_json(trained, capsys), eval_json(out, capsys)
    assert after["val_bpb"] == pytest.approx(before["val_bpb"], rel=0.05)
    assert main(["generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "5", "--temperature", "0", "--json"]) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--format", "gguf", "--out", str(tmp_path / "q.gguf")]) == 2  # quantized: refused, not written wrong
    assert "is quantized" in capsys.readouterr().err


def test_quantized_run_fine_tunes_with_lora_and_refuses_full(trained, tmp_path, capsys):
    out = tmp_path / "q8"
    assert compress(trained, "--method", "int8", "--out", out) == 0
    rows = [f"{'pos' if i % 2 else 'neg'},the {'good' if i % 2 else 'bad'} film {i}" for i in range(24)]
    (tmp_path / "cls.csv").write_text("label,text\n" + "\n".join(rows) + "\n")
    ft = ["finetune", str(out), "--train", str(tmp_path / "cls.csv"), "--epochs", "1", "--out"]
    assert main([*ft, str(tmp_path / "lora"), "--method", "lora"]) == 0
    assert main(["predict", str(tmp_path / "lora"), "--input", str(tmp_path / "cls.csv"), "--output", str(tmp_path / "pred.csv")]) == 0
    capsys.readouterr()
    assert main([*ft, str(tmp_path / "full"), "--method", "full"]) == 2
    assert "--method lora, adapter or prefix" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# structured pruning


MASKED = {"objective": "masked", "mlp": "geglu", "norm": "layernorm"}


TOKEN_FEATURES = {"n_kv_head": 2, "value_embeddings": "all", "smear": True}


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2}, {"mlp": "relu2", "qk_norm": True}, MASKED, TOKEN_FEATURES])
def test_pruned_model_equals_the_original_with_those_units_switched_off(kw):
    torch.manual_seed(0)
    model = Transformer.build(ModelConfig(n_layer=3, n_head=4, n_embd=32, vocab_size=100, seq_len=16, **kw)).eval()
    with torch.no_grad():  # value-embedding and smear gates start at zero: give them values a pruned copy must keep
        for name, p in model.named_parameters():
            if "gate" in name or "smear" in name:
                p.normal_(0, 0.5)
    groups = model.cfg.n_kv_head or 4
    plan = PrunePlan(layers=[0, 2], groups={0: sorted({1, groups - 1}), 2: [0]}, neurons={0: list(range(0, 96, 2)), 2: [5, 7, 50]})
    small = apply_plan(model, plan)
    blk = small.layers["1"]  # the original block 2
    assert small.cfg.n_layer == 2 and small.cfg.layer_ffn == [48, 3]
    assert blk.feed_forward.w1.weight.shape == (3, 32) and blk.feed_forward.w2.weight.shape == (32, 3)
    per_group = 4 // groups
    assert blk.attention.wq.weight.shape == (per_group * 8, 32) and blk.attention.wo.weight.shape == (32, per_group * 8)
    assert small.num_params() < model.num_params()
    x = batch(model)
    with torch.no_grad(), gated(model, plan).installed():
        masked = model(x)
    with torch.no_grad():
        assert torch.allclose(small(x), masked, atol=1e-5)
        assert not torch.allclose(model(x), masked, atol=1e-3)  # the switched-off units did matter


def test_a_head_that_writes_nothing_is_pruned_for_free():
    torch.manual_seed(0)
    model = Transformer.build(ModelConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=100, seq_len=16)).eval()
    with torch.no_grad():
        model.layers["1"].attention.wo.weight[:, 16:24] = 0  # head 2 of block 1 adds nothing to the residual
        x = batch(model)
        full = model(x)
    ffn = model.layers["0"].feed_forward.w1.out_features
    plan = PrunePlan(layers=[0, 1], groups={0: [0, 1, 2, 3], 1: [0, 1, 3]}, neurons={i: list(range(ffn)) for i in (0, 1)})
    small = apply_plan(model, plan)
    assert small.cfg.layer_heads == [4, 3]
    with torch.no_grad():
        assert torch.allclose(small(x), full, atol=1e-6)
    scores = importance(model, [(x[:, :-1], x[:, 1:])])
    assert float(scores.heads[1][2]) == 0.0 and float(scores.heads[1].max()) > 0  # measured: the silent head scores 0


def test_choose_meets_the_parameter_target_and_keeps_one_of_each(trained):
    model = load_run(trained).model
    scores = Gates(model)  # uniform scores: cost alone decides
    for keep in (0.5, 0.05):
        plan = choose(model, scores, keep)
        small = apply_plan(model, plan)
        blocks = lambda m: sum(p.numel() for n, p in m.named_parameters() if n.startswith("layers."))
        assert blocks(small) <= keep * blocks(model) * 1.001
        assert small.cfg.n_layer >= 1 and all(h >= 1 for h in small.cfg.layer_heads) and all(f >= 1 for f in small.cfg.layer_ffn)


def test_prune_with_recovery_through_the_cli(trained, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert compress(trained, "--method", "prune", "--keep", "0.5", "--budget", "steps:4", "--importance-batches", "2", "--out", out, "--json") == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = load_run(out)
    blocks = sum(p.numel() for n, p in run.model.named_parameters() if n.startswith("layers."))
    before = sum(p.numel() for n, p in load_run(trained).model.named_parameters() if n.startswith("layers."))
    assert blocks <= 0.5 * before * 1.001 and record["params_after"] == run.model.num_params() < record["params_before"]
    assert run.config.model.layer_ffn and (out / "pruned.safetensors").is_file() and record["recovery"]["steps"] == 4
    assert eval_json(out, capsys)["val_bpb"] > 0
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "5", "--temperature", "0", "--json"]) == 0
    assert main(["pretrain", "--resume", str(out), "--budget", "steps:6", "--json"]) == 0  # the recovery is an ordinary run
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 6
    assert compress(trained, "--method", "prune", "--speedup", "1.3", "--units", "layers", "--importance-batches", "1", "--out", tmp_path / "p2") == 0
    assert load_run(tmp_path / "p2").config.model.n_layer < 3
    assert main(["export", str(out), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2  # per-block sizes: no Llama config
    assert "per-block sizes" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# magnitude pruning


def test_unstructured_sparsity_is_reported_and_loads(trained, tmp_path, capsys):
    out = tmp_path / "sparse"
    assert compress(trained, "--method", "sparse", "--sparsity", "0.6", "--out", out, "--json") == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["block_weight_sparsity"] == pytest.approx(0.6, abs=0.01) and 0 < record["overall_sparsity"] < 0.6
    model = load_run(out).model
    w = torch.cat([m.weight.flatten() for n, m in model.named_modules() if n.startswith("layers.") and isinstance(m, torch.nn.Linear)])
    assert float((w == 0).float().mean()) == pytest.approx(0.6, abs=0.01)
    assert eval_json(out, capsys)["val_bpb"] > 0  # 2:4 (GPU only): tests/test_compress_gpu.py


# ---------------------------------------------------------------------------------------------
# distillation


def test_soft_target_loss_is_zero_only_for_equal_logits():
    s = torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    assert float(soft_target_loss(s, s.clone(), y, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(soft_target_loss(s, torch.randn(2, 5, 11), y, 2.0)) > 0
    y[0, 0] = -100  # a position without a target is left out
    t = s.clone()
    t[0, 0] += 5 * torch.randn(11)
    assert float(soft_target_loss(s, t, y, 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_trains_a_smaller_student(trained, tmp_path, capsys):
    out = tmp_path / "student"
    args = [trained, "--method", "distill", "--budget", "steps:15", "--out", out, "--json", "--set", "model.n_layer=1", "--set", "model.n_embd=32"]
    assert compress(*args) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    student, teacher = load_run(out), load_run(trained)
    assert student.model.num_params() == record["params_after"] < teacher.model.num_params() == record["params_before"]
    assert student.config.model.n_layer == 1
    losses = [r["loss"] for r in read_metrics(out) if r["kind"] == "train"]
    assert len(losses) == 15 and sum(losses[-3:]) < sum(losses[:3])  # the mixed distillation loss falls
    assert eval_json(out, capsys)["val_bpb"] > 0 and record["status"] == "done"
    assert main(["pretrain", "--resume", str(out), "--budget", "steps:20"]) == 2  # its loss needs the teacher
    assert "distilled student" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_requests_give_one_error_line(trained, tmp_path, capsys):
    d = tmp_path
    fails(capsys, [trained, "--method", "zip", "--out", d / "a"], "'zip' is not one of int8")
    fails(capsys, [trained, "--method", "prune", "--keep", "1.5", "--out", d / "b"], "--keep")
    fails(capsys, [trained, "--method", "prune", "--keep", "0.5", "--speedup", "2", "--out", d / "c"], "not both")
    fails(capsys, [trained, "--method", "prune", "--units", "rows", "--out", d / "d"], "--units")
    fails(capsys, [trained, "--method", "prune", "--speedup", "100", "--out", d / "e"], "out of reach")
    fails(capsys, [trained, "--method", "sparse", "--sparsity", "1", "--out", d / "f"], "--sparsity")
    fails(capsys, [trained, "--method", "int8", "--budget", "10s", "--out", d / "g"], "does not train")
    fails(capsys, [trained, "--method", "distill", "--set", "model.objective=masked", "--out", d / "h"], "objective")
    fails(capsys, [trained, "--method", "distill", "--set", "model.n_layer=5", "--out", d / "i"], "no smaller than the teacher")
    fails(capsys, [d / "nothing", "--method", "int8", "--out", d / "j"], "not a budgetlm run")
    (d / "busy").mkdir()
    (d / "busy" / "x").write_text("x")
    fails(capsys, [trained, "--method", "int8", "--out", d / "busy"], "not empty")
    assert compress(trained, "--method", "int8", "--out", d / "q") == 0
    fails(capsys, [d / "q", "--method", "int8-dyn", "--out", d / "k"], "already quantized")
    assert not any((d / name).exists() for name in "abcdefghijk")  # nothing half-written left behind


def test_a_masked_run_prunes_and_quantizes(prepared_wordpiece, tmp_path, capsys):
    run = tmp_path / "bert"
    pretrain(resolve_config(None, "steps:3", [*TINY, *(f"model.{k}={v}" for k, v in MASKED.items())], str(prepared_wordpiece)), run)
    assert compress(run, "--method", "prune", "--keep", "0.6", "--importance-batches", "1", "--out", tmp_path / "p") == 0
    assert compress(run, "--method", "int8", "--out", tmp_path / "q") == 0
    for out in ("p", "q"):
        got = eval_json(tmp_path / out, capsys)
        assert got["val_loss"] > 0 and "val_bpb" not in got  # masked: no bits per byte
    assert load_run(tmp_path / "p").model.num_params() < load_run(run).model.num_params()


def test_a_pruned_body_fine_tunes_with_every_method(tmp_path):
    from budgetlm.finetune.heads import TaskModel
    from budgetlm.finetune.methods import MethodOptions, apply_method

    torch.manual_seed(0)
    model = Transformer.build(ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, vocab_size=100, seq_len=16))
    plan = PrunePlan(layers=[0, 1], groups={0: [0, 1], 1: [1]}, neurons={0: [1, 2], 1: [3]})  # block 1 keeps 1 of 2 key/value heads
    x = batch(model)
    for method in ("full", "lora", "adapter", "prefix"):
        task = TaskModel(apply_plan(model, plan), "classify", 2)
        apply_method(task, method, MethodOptions(lora_targets=("wq", "wv")))
        out = task(x, torch.full((2,), 16))
        out.float().sum().backward()  # the per-block sizes reach every method's forward and backward
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.parameters() if p.requires_grad)


def test_the_server_batches_a_pruned_and_a_quantized_run(trained, tmp_path, capsys):
    """`budgetlm serve` loads compressed runs like any run; its continuous batching gives each
    sequence the tokens `generate` gives it alone, with per-block key/value heads after pruning."""
    from budgetlm.generate import stream
    from budgetlm.serve.engine import Engine
    from budgetlm.serve.scheduler import SamplingParams, Scheduler, Sequence

    outs = {"pruned": tmp_path / "pruned", "int8": tmp_path / "int8"}
    assert compress(trained, "--method", "prune", "--keep", "0.8", "--units", "heads", "--importance-batches", "1", "--out", outs["pruned"]) == 0
    assert compress(trained, "--method", "int8", "--out", outs["int8"]) == 0
    assert min(load_run(outs["pruned"]).config.model.layer_heads) < 4  # some block lost key/value heads
    for out in outs.values():
        engine = Engine(out)
        sched = Scheduler(engine.body, engine.tokenizer, max_batch=2)
        prompts = [engine.encode_prompt("ROMEO:"), engine.encode_prompt("KING HENRY. My lord")]
        runs = []
        for p in prompts:
            events = []
            sched.submit(Sequence(p, SamplingParams(max_tokens=6, temperature=0), engine.tokenizer, events.append))
            runs.append(events)
        for _ in range(100):
            if not sched.active and not sched.waiting:
                break
            sched.step()
        for p, events in zip(prompts, runs):
            alone = [int(t) for t in stream(engine.body, torch.tensor([p]), 6, temperature=0)]
            assert [e.token_id for e in events] == alone, out.name
