"""Downstream task metrics, computed by the libraries the field trusts for them.

Accuracy, macro-F1 and Matthews correlation come from scikit-learn; Pearson and Spearman from
SciPy; span-level F1 of BIO tags from seqeval (the CoNLL-2000 `conlleval` definition: a span counts
only when its type and both boundaries match). They are the `finetune` extra and imported here
only, so the core install stays small.
"""

from __future__ import annotations

import math
from collections import Counter

from budgetlm.errors import UserError


def _sklearn():
    try:
        from sklearn import metrics
    except ImportError:
        raise UserError("task metrics need scikit-learn: pip install 'budgetlm[finetune]'") from None
    return metrics


def accuracy(y_true: list, y_pred: list) -> float:
    return float(_sklearn().accuracy_score(y_true, y_pred))


def macro_f1(y_true: list, y_pred: list) -> float:
    """Unweighted mean of per-class F1 over the classes present in either list."""
    return float(_sklearn().f1_score(y_true, y_pred, average="macro", zero_division=0))


def matthews(y_true: list, y_pred: list) -> float:
    """Matthews correlation (CoLA's metric); 0 for a constant prediction, 1 for perfect."""
    return float(_sklearn().matthews_corrcoef(y_true, y_pred))


def _nan_to_zero(x: float) -> float:
    # a constant prediction has no correlation; scipy returns nan (with a warning) for it
    return 0.0 if x is None or math.isnan(x) else float(x)


def pearson(y_true: list[float], y_pred: list[float]) -> float:
    import warnings

    from scipy import stats

    if len(set(y_pred)) < 2 or len(set(y_true)) < 2:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _nan_to_zero(stats.pearsonr(y_true, y_pred)[0])


def spearman(y_true: list[float], y_pred: list[float]) -> float:
    import warnings

    from scipy import stats

    if len(set(y_pred)) < 2 or len(set(y_true)) < 2:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _nan_to_zero(stats.spearmanr(y_true, y_pred)[0])


def token_accuracy(tags_true: list[list[str]], tags_pred: list[list[str]]) -> float:
    """Share of tokens whose tag is right, over all tokens of all sentences."""
    total = correct = 0
    for t, p in zip(tags_true, tags_pred):
        if len(t) != len(p):
            raise ValueError(f"sentence has {len(t)} gold tags but {len(p)} predicted")
        total += len(t)
        correct += sum(a == b for a, b in zip(t, p))
    return correct / total if total else 0.0


def is_bio(labels) -> bool:
    """True when every tag is O or starts with B-/I- (IOB2/IOBES-like), so spans are defined."""
    labels = set(labels)
    return bool(labels) and "O" in labels and all(t == "O" or t[:2] in ("B-", "I-", "E-", "S-") for t in labels)


def span_f1(tags_true: list[list[str]], tags_pred: list[list[str]]) -> float:
    """Micro-averaged entity-level F1 (seqeval, conlleval semantics)."""
    try:
        from seqeval.metrics import f1_score
    except ImportError:
        raise UserError("span F1 needs seqeval: pip install 'budgetlm[finetune]'") from None
    return float(f1_score(tags_true, tags_pred, zero_division=0))


# ---------------------------------------------------------------------------------------------
# per task


def task_metrics(task: str, y_true: list, y_pred: list, labels: list[str] | None = None) -> dict[str, float]:
    """All metrics of a task, as a flat dict of floats."""
    if task in ("classify", "pair"):
        return {"accuracy": accuracy(y_true, y_pred), "macro_f1": macro_f1(y_true, y_pred), "mcc": matthews(y_true, y_pred)}
    if task == "regress":
        mse = sum((a - b) ** 2 for a, b in zip(y_true, y_pred)) / max(1, len(y_true))
        return {"pearson": pearson(y_true, y_pred), "spearman": spearman(y_true, y_pred), "mse": mse}
    if task == "tag":
        out = {"token_accuracy": token_accuracy(y_true, y_pred)}
        if is_bio(labels if labels is not None else [t for s in y_true for t in s]):
            out["span_f1"] = span_f1(y_true, y_pred)
        return out
    raise ValueError(f"unknown task {task!r}")


def main_metric(task: str, labels: list[str] | None = None) -> str:
    """The metric early stopping and the suite rank by (higher is better)."""
    if task in ("classify", "pair"):
        return "accuracy"
    if task == "regress":
        return "spearman"
    return "span_f1" if labels is not None and is_bio(labels) else "token_accuracy"


def majority_baseline(task: str, train_labels: list, test_labels: list, labels: list[str] | None = None) -> dict[str, float]:
    """Metrics of always predicting the most frequent training label (the mean for regression)."""
    if task == "regress":
        mean = sum(train_labels) / len(train_labels)
        return task_metrics(task, test_labels, [mean] * len(test_labels))
    if task == "tag":
        top = Counter(t for s in train_labels for t in s).most_common(1)[0][0]
        return task_metrics(task, test_labels, [[top] * len(s) for s in test_labels], labels)
    top = Counter(train_labels).most_common(1)[0][0]
    return task_metrics(task, test_labels, [top] * len(test_labels))
