"""Task metrics against values computed by hand."""

import math

import pytest

from budgetlm.evaluate import metrics


def test_classification_metrics_known_values():
    y_true = ["a", "a", "b", "b"]
    y_pred = ["a", "b", "b", "b"]
    # accuracy 3/4; F1(a) = 2*1*0.5/1.5 = 2/3, F1(b) = 2*(2/3)*1/(5/3) = 4/5 -> macro 11/15
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(0.75)
    assert metrics.macro_f1(y_true, y_pred) == pytest.approx(11 / 15)
    # MCC = (TP*TN - FP*FN)/sqrt(...), with b positive: TP=2 TN=1 FP=1 FN=0 -> 2/sqrt(3*2*1*2)
    assert metrics.matthews(y_true, y_pred) == pytest.approx(2 / math.sqrt(12))
    assert metrics.matthews(y_true, ["a"] * 4) == 0.0


def test_correlations_known_values():
    assert metrics.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert metrics.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ranks of y_pred: [1, 3, 2] against [1, 2, 3]: rho = 1 - 6*(0+1+1)/(3*8) = 0.5
    assert metrics.spearman([1, 2, 3], [10, 30, 20]) == pytest.approx(0.5)
    assert metrics.pearson([1, 2, 3], [5, 5, 5]) == 0.0  # constant prediction: no correlation, no nan


def test_token_accuracy_and_span_f1():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["O", "B-LOC"]]
    assert metrics.token_accuracy(gold, pred) == pytest.approx(4 / 6)
    # gold spans: PER, LOC, ORG (3); predicted: PER, LOC@(1,1) (2); correct: PER -> P=1/2 R=1/3 F1=0.4
    assert metrics.span_f1(gold, pred) == pytest.approx(0.4)
    out = metrics.task_metrics("tag", gold, pred)
    assert set(out) == {"token_accuracy", "span_f1"}
    assert set(metrics.task_metrics("tag", [["NN", "VB"]], [["NN", "NN"]])) == {"token_accuracy"}


def test_main_metric_and_majority_baseline():
    assert metrics.main_metric("classify") == "accuracy"
    assert metrics.main_metric("tag", ["O", "B-X", "I-X"]) == "span_f1"
    assert metrics.main_metric("tag", ["NN", "VB"]) == "token_accuracy"
    base = metrics.majority_baseline("classify", ["x", "x", "y"], ["x", "y", "y", "y"])
    assert base["accuracy"] == pytest.approx(0.25)
    base = metrics.majority_baseline("tag", [["NN", "NN", "VB"]], [["NN", "DT"]])
    assert base["token_accuracy"] == pytest.approx(0.5)
    base = metrics.majority_baseline("regress", [1.0, 3.0], [0.0, 4.0])
    assert base["mse"] == pytest.approx(4.0)
