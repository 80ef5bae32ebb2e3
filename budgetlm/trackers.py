"""Experiment trackers a run can also report to, beside its own metrics.jsonl: TensorBoard, Weights &
Biases and MLflow, chosen by one setting (`train.trackers`, a comma-separated list or `none`).

Each gets the same things: the run's settings as hyperparameters (at the start), every numeric
metric as a scalar series (`train/loss`, `eval/val_bpb`, ...), texts such as the report's samples,
and the final metrics (TensorBoard's hyperparameter table pairs them with the settings). A tracker
whose library is not installed is skipped with one note on stderr naming the package; training goes
on, since metrics.jsonl already holds everything.

Where they write, without a network unless the user says otherwise:
- tensorboard: RUN/tb;
- wandb: offline into RUN/wandb (upload later with `wandb sync RUN/wandb/offline-run-*`), unless
  `WANDB_MODE` says otherwise or `WANDB_API_KEY` is set; project `WANDB_PROJECT` or "budgetlm";
- mlflow: `MLFLOW_TRACKING_URI` if set, else a SQLite file, RUN/mlflow.db (`mlflow ui --backend-store-uri
  sqlite:///RUN/mlflow.db`); experiment `MLFLOW_EXPERIMENT_NAME` or "budgetlm".
A resumed or extended run continues the same W&B and MLflow run: their ids are kept in RUN/trackers.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from budgetlm.errors import UserError
from budgetlm.files import write_text_atomic

TRACKERS = ("tensorboard", "wandb", "mlflow")
IDS_FILE = "trackers.json"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny with sqlalchemy"}


def parse_trackers(value: str) -> list[str]:
    """`"tensorboard,wandb"` -> ["tensorboard", "wandb"]; "none" or "" -> []."""
    names = [n.strip().lower() for n in str(value).split(",") if n.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise UserError(f"train.trackers: unknown tracker {unknown[0]!r}; choose from {', '.join(TRACKERS)} (comma-separated) or none")
    return list(dict.fromkeys(names))


def flatten(settings: dict, prefix: str = "") -> dict:
    """{"model": {"n_layer": 2}} -> {"model.n_layer": 2}; values that are not numbers, strings or booleans become strings."""
    out = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, name + ".")
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


class TensorBoard:
    def __init__(self, run_dir: Path, name: str, settings: dict, ids: dict):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(str(run_dir / "tb"))
        self.settings = settings
        self.writer.add_text("settings", "\n".join(f"    {k}: {v}" for k, v in settings.items()), 0)

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def finish(self, final: dict) -> None:
        # the hyperparameter table: every setting beside the final metrics (in the same log directory)
        self.writer.add_hparams(self.settings, {f"final/{k}": v for k, v in final.items()}, run_name=".")

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, name: str, settings: dict, ids: dict):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "budgetlm"), name=name, dir=str(run_dir), mode=mode, config=settings,
            id=ids.get("wandb"), resume="allow", settings=wandb.Settings(silent=True, console="off"),
        )  # fmt: skip
        ids["wandb"] = self.run.id

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        self.run.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{_escape(text)}</pre>")}, step=step)

    def finish(self, final: dict) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in final.items()})

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, run_dir: Path, name: str, settings: dict, ids: dict):
        import logging

        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not a line per database migration on stderr
        # a local SQLite file: MLflow's file store is in maintenance mode and refuses to start by default
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        self.client = MlflowClient(uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
        if ids.get("mlflow"):
            self.run_id = ids["mlflow"]
        else:
            experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "budgetlm")
            experiment = self.client.get_experiment_by_name(experiment_name)
            # artifacts (the samples) beside the database, not in ./mlruns of whatever folder the command ran in
            where = None if uri else (run_dir / "mlflow-artifacts").resolve().as_uri()
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name, artifact_location=where)
            self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            ids["mlflow"] = self.run_id
            from mlflow.entities import Param

            params = [Param(k, str(v)[:6000]) for k, v in settings.items()]
            for i in range(0, len(params), 100):  # the API takes at most 100 parameters a call
                self.client.log_batch(self.run_id, params=params[i : i + 100])

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"{prefix}/{k}", float(v), now, step) for k, v in values.items()])

    def text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"{tag}/step-{step}.txt")

    def finish(self, final: dict) -> None:
        self.scalars("final", final, 0)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


BACKENDS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def open_trackers(names: list[str], run_dir: Path, settings: dict) -> list:
    """The chosen trackers that could start; a missing library is one note on stderr, not an error."""
    run_dir = Path(run_dir)
    ids_path = run_dir / IDS_FILE
    ids = json.loads(ids_path.read_text(encoding="utf-8")) if ids_path.is_file() else {}
    flat = flatten(settings)
    opened = []
    for name in names:
        try:
            opened.append(BACKENDS[name](run_dir, run_dir.resolve().name, flat, ids))
        except ImportError:
            print(f"note: train.trackers names {name}, but {PACKAGES[name]} is not installed (pip install 'budgetlm[track]'); "
                  "its metrics are in metrics.jsonl only", file=sys.stderr)  # fmt: skip
    if ids:
        write_text_atomic(ids_path, json.dumps(ids, indent=2) + "\n")
    return opened
