"""What a run records for people: the trackers chosen by `train.trackers` (TensorBoard, W&B offline,
MLflow) get the settings, the metrics and the samples; the report names the command, the date and
the environment; a missing library is a note, a misspelt tracker an error."""

from __future__ import annotations

import json
import sys

import pytest
from test_pretrain import tiny_args

from budgetlm.cli import main
from budgetlm.trackers import IDS_FILE, open_trackers, parse_trackers
from budgetlm.tracking import read_metrics

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def tracked_run(prepared_bpe, tmp_path_factory):
    run = tmp_path_factory.mktemp("tracked") / "run"
    assert main(tiny_args(prepared_bpe, run, "steps:20", "train.trackers=tensorboard,wandb,mlflow")) == 0
    return run


def test_tensorboard_gets_scalars_samples_and_the_settings_table(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "tb"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    jsonl = {r["step"]: r["loss"] for r in read_metrics(tracked_run) if r["kind"] == "train"}
    assert losses == pytest.approx(jsonl) and len(losses) >= 3
    assert "eval/val_bpb" in events.Tags()["scalars"]
    texts = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]}
    assert "▌" in texts["samples/text_summary"]  # prompt, then the model's continuation
    assert "model.n_layer: 2" in texts["settings/text_summary"]
    plugin_files = list((tracked_run / "tb").glob("events.out.tfevents.*"))
    assert len(plugin_files) == 2 and any(b"final/val_bpb" in p.read_bytes() and b"model.n_layer" in p.read_bytes() for p in plugin_files)


def test_wandb_runs_offline_inside_the_run(tracked_run):
    offline = list((tracked_run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    ids = json.loads((tracked_run / IDS_FILE).read_text())
    log = (offline[0] / f"run-{ids['wandb']}.wandb").read_bytes()  # W&B's record log, uploaded later by `wandb sync`
    for key in (b"train/loss", b"eval/val_bpb", b"final/val_bpb", b"model.n_layer"):
        assert key in log, key
    samples = list((offline[0] / "files" / "media" / "html").glob("samples_*.html"))
    assert samples and "▌" in samples[0].read_text()


def test_mlflow_run_holds_params_metric_history_and_samples(tracked_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tracked_run / 'mlflow.db'}")
    run_id = json.loads((tracked_run / IDS_FILE).read_text())["mlflow"]
    run = client.get_run(run_id)
    assert run.data.params["model.n_layer"] == "2" and run.info.status == "FINISHED"
    jsonl = {r["step"]: r["loss"] for r in read_metrics(tracked_run) if r["kind"] == "train"}
    assert {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")} == pytest.approx(jsonl)
    assert "final/val_bpb" in run.data.metrics
    text = (tracked_run / "mlflow-artifacts").rglob("step-*.txt")
    assert any("▌" in p.read_text() for p in text)
    # a resumed run reports to the same MLflow run
    again = open_trackers(["mlflow"], tracked_run, {})
    assert again[0].run_id == run_id


def test_report_names_the_command_the_date_and_the_environment(tracked_run):
    report = (tracked_run / "report.md").read_text()
    run_section = report.split("## Run", 1)[1]
    assert "budgetlm pretrain --data" in run_section and "train.trackers=tensorboard,wandb,mlflow" in run_section
    env = json.loads((tracked_run / "env.json").read_text())
    assert env["started"][:2] == "20" and env["started"] in run_section and env["torch"] in run_section


def test_missing_tracker_library_is_one_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    assert open_trackers(["wandb"], tmp_path, {"model": {"n_layer": 2}}) == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "wandb is not installed" in err and "metrics.jsonl" in err


def test_tracker_names(prepared_bpe, tmp_path, capsys):
    assert parse_trackers("none") == [] and parse_trackers(" TensorBoard, mlflow,tensorboard") == ["tensorboard", "mlflow"]
    assert main(tiny_args(prepared_bpe, tmp_path / "run", "steps:2", "train.trackers=tensorboard,comet")) == 2
    err = capsys.readouterr().err
    assert "unknown tracker 'comet'" in err and err.count("\n") == 1
