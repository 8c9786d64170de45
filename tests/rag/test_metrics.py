"""Retrieval metrics against values computed by hand."""

from __future__ import annotations

import math

import pytest

from conclave.rag.metrics import evaluate, mrr_at_k, ndcg_at_k, recall_at_k


def test_ndcg_binary_by_hand():
    # relevant: a, c; ranking a, b, c -> DCG = 1/log2(2) + 1/log2(4) = 1 + 0.5
    # ideal: 1 + 1/log2(3)
    got = ndcg_at_k(["a", "b", "c"], {"a": 1, "c": 1})
    assert got == pytest.approx(1.5 / (1 + 1 / math.log2(3)))


def test_ndcg_graded_and_cutoff():
    judged = {"x": 2, "y": 1}
    # y first, x second: DCG = 1/1 + 2/log2(3); ideal = 2/1 + 1/log2(3)
    assert ndcg_at_k(["y", "x"], judged) == pytest.approx(
        (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    # relevant doc beyond k contributes nothing
    assert ndcg_at_k(["n1", "n2", "x"], judged, k=2) == 0.0
    assert ndcg_at_k(["x", "y"], judged) == pytest.approx(1.0)


def test_recall_and_mrr():
    judged = {"a": 1, "b": 1, "c": 0}
    assert recall_at_k(["c", "a", "z"], judged) == 0.5
    assert recall_at_k([], judged) == 0.0
    assert mrr_at_k(["c", "z", "b"], judged) == pytest.approx(1 / 3)
    assert mrr_at_k(["z"] * 10 + ["a"], judged) == 0.0  # beyond k=10


def test_evaluate_means_and_skips_unjudged_queries():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 0}}
    run = {"q1": ["a", "x"], "q2": ["x", "b"]}
    res = evaluate(run, qrels)
    assert res["queries"] == 2
    assert res["mrr@10"] == pytest.approx((1 + 0.5) / 2)
    assert res["recall@10"] == 1.0
    assert res["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 2)
