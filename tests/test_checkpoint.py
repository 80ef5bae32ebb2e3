"""Checkpoints: bitwise round trip, tied weights, atomicity under crashes and kills, clear errors."""

import copy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import safetensors
import torch
from torch import nn

from budgetlm import checkpoint as C
from budgetlm.errors import UserError
from budgetlm.optim import param_groups


class TinyLM(nn.Module):
    def __init__(self, n_embd: int = 8, vocab: int = 32):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, n_embd)
        self.norm = nn.LayerNorm(n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.output = nn.Linear(n_embd, vocab, bias=False)
        self.output.weight = self.tok_embeddings.weight  # tied

    def forward(self, idx):
        return self.output(torch.relu(self.proj(self.norm(self.tok_embeddings(idx)))))


IDX = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])


def _train_step(model, opt):
    loss = nn.functional.cross_entropy(model(IDX).flatten(0, 1), IDX.roll(1).flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _make(seed):
    torch.manual_seed(seed)
    model = TinyLM()
    return model, torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2, fused=True)


def _clone_state(sd):
    return {k: v.detach().clone() for k, v in sd.items()}


def _assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _draws():
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_round_trip_is_bitwise_and_resumes_exactly(tmp_path):
    model, opt = _make(0)
    for _ in range(3):
        _train_step(model, opt)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = tmp_path / "run" / "checkpoint"
    loop = {"step": 3, "tokens": 24, "clock": {"elapsed": 12.5, "step_time": 0.5}, "lr_scale": 0.5}
    C.save_checkpoint(path, model_state=model.state_dict(), optimizer_state=opt.state_dict(), loop_state=loop, extra_files={"config.yaml": b"a: 1\n"})
    saved_model = _clone_state(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())  # state_dict() holds the live tensors
    after_save = _draws()
    _train_step(model, opt)

    model2, opt2 = _make(42)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    assert C.load_checkpoint(path, model2, opt2) == loop
    assert _draws() == after_save
    _assert_same_tensors(model2.state_dict(), saved_model)
    assert model2.output.weight is model2.tok_embeddings.weight  # the tie survives loading
    state2 = opt2.state_dict()
    assert state2["param_groups"] == saved_opt["param_groups"]
    for i, s in saved_opt["state"].items():
        _assert_same_tensors(state2["state"][i], s)
    _train_step(model2, opt2)
    _assert_same_tensors(model2.state_dict(), model.state_dict())

    assert C.read_loop_state(path) == loop
    assert C.read_extra_file(path, "config.yaml") == b"a: 1\n"
    assert sorted(os.listdir(path)) == ["config.yaml", "model.safetensors", "optimizer.pt", "rng.pt", "state.json"]
    assert sorted(os.listdir(path.parent)) == ["checkpoint"]
    assert json.loads((path / "state.json").read_text())["format"] == "budgetlm-ckpt/1"


def test_tied_tensor_is_stored_once(tmp_path):
    model = TinyLM()
    C.save_weights(tmp_path / "model.safetensors", model)
    with safetensors.safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert "output.weight" not in f.keys() and "tok_embeddings.weight" in f.keys()
        assert json.loads(f.metadata()[C.ALIASES_KEY]) == {"output.weight": "tok_embeddings.weight"}
    other = TinyLM()
    C.load_weights(tmp_path / "model.safetensors", other)
    _assert_same_tensors(other.state_dict(), model.state_dict())
    assert other.output.weight is other.tok_embeddings.weight


def test_views_and_partial_overlaps_are_cloned(tmp_path):
    base = torch.arange(12.0)
    state = {"a": base[:6].view(2, 3), "b": base[6:], "c": base.view(3, 4).t(), "d": base[:6].view(2, 3)}
    tensors, aliases = C._flatten_state(state)
    assert aliases == {"d": "a"}
    safetensors.torch.save_file(tensors, str(tmp_path / "x.safetensors"))  # would raise on shared storage
    assert torch.equal(tensors["c"], base.view(3, 4).t())


def test_load_falls_back_to_old_and_next_save_repairs(tmp_path):
    path = tmp_path / "checkpoint"
    model, opt = _make(0)
    C.save_checkpoint(path, model_state=model.state_dict(), optimizer_state=None, loop_state={"step": 1})
    os.replace(path, tmp_path / "checkpoint.old")  # as if killed between the two renames
    (tmp_path / "checkpoint.tmp-dead").mkdir()
    assert C.read_loop_state(path) == {"step": 1}
    C.save_checkpoint(path, model_state=model.state_dict(), optimizer_state=None, loop_state={"step": 2})
    assert C.read_loop_state(path) == {"step": 2}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]


class Crash(BaseException):
    """Stands in for a kill: nothing in checkpoint.py gets to clean up after it."""


def _weights_step(path):
    """The step recorded in a checkpoint, checked against the weights saved with it."""
    model = TinyLM()
    step = C.load_checkpoint(path, model, restore_rng=False)["step"]
    assert torch.all(model.proj.weight == step)
    return step


def _save_step(path, step):
    model = TinyLM()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step)
    C.save_checkpoint(path, model_state=model.state_dict(), optimizer_state=None, loop_state={"step": step})


def test_crash_at_every_file_system_step_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint"
    _save_step(path, 1)
    seen = set()
    for k in range(100):
        calls = [0]

        def crashing(real, k=k, calls=calls):
            def op(*args, **kwargs):
                if calls[0] == k:
                    raise Crash
                calls[0] += 1
                return real(*args, **kwargs)

            return op

        with monkeypatch.context() as m:
            for mod, name in [(os, "fsync"), (os, "replace"), (shutil, "rmtree")]:
                m.setattr(mod, name, crashing(getattr(mod, name)))
            try:
                _save_step(path, 2)
                finished = True
            except Crash:
                finished = False
        seen.add(_weights_step(path))
        if finished:
            break
        _save_step(path, 1)  # repairs what the crash left, and starts the next trial from step 1
        assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
    assert finished and k > 5
    assert seen == {1, 2}


KILLER = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from budgetlm.checkpoint import save_checkpoint
    model = nn.Linear(256, 512)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 256)).sum().backward()
    opt.step()
    for step in range(1, 10**6):
        with torch.no_grad():
            model.weight.fill_(step)
        save_checkpoint(sys.argv[1], model_state=model.state_dict(), optimizer_state=opt.state_dict(), loop_state={"step": step})
        print(step, flush=True)
    """
)


def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "checkpoint"
    script = tmp_path / "saver.py"
    script.write_text(KILLER)
    rng = random.Random(0)
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
        for _ in range(3):  # let a few saves complete, then kill at a random moment of the next ones
            assert proc.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        model = nn.Linear(256, 512)
        opt = torch.optim.AdamW(model.parameters())
        step = C.load_checkpoint(path, model, opt)["step"]
        assert step >= 3 and torch.all(model.weight == step)


def test_mismatched_model_names_the_tensor(tmp_path):
    C.save_weights(tmp_path / "w.safetensors", TinyLM(n_embd=8))
    with pytest.raises(UserError, match="'tok_embeddings.weight' has shape \\(32, 8\\) there but \\(32, 16\\)"):
        C.load_weights(tmp_path / "w.safetensors", TinyLM(n_embd=16))
    with pytest.raises(UserError, match="'extra.weight' is missing"):
        bigger = TinyLM()
        bigger.extra = nn.Linear(2, 2)
        C.load_weights(tmp_path / "w.safetensors", bigger)
    smaller = TinyLM()
    del smaller.proj
    with pytest.raises(UserError, match="it has tensor 'proj.bias' that the model lacks \\(2 extra in all\\)"):
        C.load_weights(tmp_path / "w.safetensors", smaller)


def test_mismatched_optimizer(tmp_path):
    model, opt = _make(0)
    _train_step(model, opt)
    C.save_checkpoint(tmp_path / "c", model_state=model.state_dict(), optimizer_state=opt.state_dict(), loop_state={})
    other = torch.optim.AdamW(model.parameters())  # one group instead of two
    with pytest.raises(UserError, match="optimizer state does not match"):
        C.load_checkpoint(tmp_path / "c", TinyLM(), other)
    swapped = torch.optim.AdamW([{"params": list(reversed(g["params"]))} for g in param_groups(model, 0.1)])
    with pytest.raises(UserError, match="optimizer state 'exp_avg' of parameter \\d+ has shape"):
        C.load_checkpoint(tmp_path / "c", TinyLM(), swapped)


def test_missing_and_damaged_checkpoints(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        C.load_checkpoint(tmp_path / "nothing", TinyLM())
    with pytest.raises(UserError, match="weights file not found"):
        C.load_weights(tmp_path / "nothing.safetensors", TinyLM())
    path = tmp_path / "c"
    model, opt = _make(0)
    _train_step(model, opt)
    C.save_checkpoint(path, model_state=model.state_dict(), optimizer_state=opt.state_dict(), loop_state={"step": 1})

    def damage(name, keep=100):
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[:keep])
        return data

    good = damage("model.safetensors")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        C.load_checkpoint(path, TinyLM())
    (path / "model.safetensors").write_bytes(good)
    damage("optimizer.pt")
    with pytest.raises(UserError, match="optimizer.pt is unreadable"):
        C.load_checkpoint(path, TinyLM(), _make(1)[1])
    (path / "state.json").write_text('{"format": "other/9", "step": 1}')
    with pytest.raises(UserError, match="format 'other/9'"):
        C.read_loop_state(path)
    (path / "state.json").write_text("{not json")
    with pytest.raises(UserError, match="state.json is unreadable"):
        C.load_checkpoint(path, TinyLM())


def test_bad_arguments(tmp_path):
    sd = TinyLM().state_dict()
    with pytest.raises(ValueError):
        C.save_checkpoint(tmp_path / "c", model_state=sd, optimizer_state=None, loop_state={"format": 1})
    with pytest.raises(ValueError):
        C.save_checkpoint(tmp_path / "c", model_state=sd, optimizer_state=None, loop_state={}, extra_files={"../x": b""})
    with pytest.raises(TypeError):
        C.save_checkpoint(tmp_path / "c", model_state=sd, optimizer_state=None, loop_state={"x": object()})
    assert not (tmp_path / "c").exists()
