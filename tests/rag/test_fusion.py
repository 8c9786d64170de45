"""Fusion functions: values computed by hand, and the edge cases fusion must survive."""

from __future__ import annotations

import math
import random

import pytest

from conclave.rag.fusion import dedupe, minmax, rrf, weighted


def test_rrf_values_match_the_formula() -> None:
    dense = [("a", 0.9), ("b", 0.8), ("c", 0.1)]
    keyword = [("c", 12.0), ("a", 3.0)]
    fused = dict(rrf([dense, keyword], k=60))
    assert fused["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert fused["b"] == pytest.approx(1 / 62)
    assert fused["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert [i for i, _ in rrf([dense, keyword])] == ["a", "c", "b"]


def test_rrf_weights_scale_each_list() -> None:
    fused = dict(rrf([[("a", 1.0)], [("b", 1.0)]], k=10, weights=[2.0, 0.5]))
    assert fused == {"a": pytest.approx(2 / 11), "b": pytest.approx(0.5 / 11)}


@pytest.mark.parametrize("fuse", [rrf, weighted])
def test_one_side_empty_keeps_the_other_sides_order(fuse) -> None:
    side = [("x", 3.0), ("y", 2.0), ("z", 1.0)]
    assert [i for i, _ in fuse([side, []])] == ["x", "y", "z"]
    assert [i for i, _ in fuse([[], side])] == ["x", "y", "z"]
    assert fuse([[], []]) == []
    assert fuse([]) == []


@pytest.mark.parametrize("fuse", [rrf, weighted])
def test_ties_are_ordered_by_id_whatever_the_input_order(fuse) -> None:
    # "b" first on one side and "a" first on the other: equal fused scores.
    one = fuse([[("b", 1.0), ("a", 0.5)], [("a", 1.0), ("b", 0.5)]])
    two = fuse([[("a", 1.0), ("b", 0.5)], [("b", 1.0), ("a", 0.5)]])
    assert one[0][1] == pytest.approx(one[1][1])
    assert [i for i, _ in one] == [i for i, _ in two] == ["a", "b"]


def test_duplicate_ids_count_once_at_their_best_rank() -> None:
    ranking = [("a", 5.0), ("b", 4.0), ("a", 3.0), ("c", 2.0)]
    assert dedupe(ranking) == [("a", 5.0), ("b", 4.0), ("c", 2.0)]
    fused = dict(rrf([ranking], k=60))
    assert fused == {"a": pytest.approx(1 / 61), "b": pytest.approx(1 / 62),
                     "c": pytest.approx(1 / 63)}
    assert dict(weighted([ranking]))["a"] == pytest.approx(1.0)


def test_minmax_edge_cases() -> None:
    assert minmax([("a", 2.0), ("b", 1.0), ("c", 0.0)]) == {"a": 1.0, "b": 0.5, "c": 0.0}
    # all-zero scores: the side knows nothing, it contributes nothing
    assert minmax([("a", 0.0), ("b", 0.0)]) == {"a": 0.0, "b": 0.0}
    # all equal and positive (or a lone hit): every member fully counts
    assert minmax([("a", 0.7), ("b", 0.7)]) == {"a": 1.0, "b": 1.0}
    assert minmax([("a", 0.3)]) == {"a": 1.0}
    assert minmax([]) == {}
    # non-finite scores do not poison the others
    out = minmax([("a", math.inf), ("b", 1.0), ("c", 0.0), ("d", -math.inf)])
    assert out == {"a": 1.0, "b": 1.0, "c": 0.0, "d": 0.0}


def test_weighted_all_zero_side_does_not_change_the_order() -> None:
    dense = [("a", 0.9), ("b", 0.5), ("c", 0.4)]
    zeros = [("c", 0.0), ("b", 0.0)]
    assert [i for i, _ in weighted([dense, zeros])] == ["a", "b", "c"]
    fused = dict(weighted([dense, zeros]))
    assert fused["a"] == pytest.approx(1.0)
    assert fused["c"] == pytest.approx(0.0)


def test_weighted_values_and_weights() -> None:
    dense = [("a", 0.9), ("b", 0.7), ("c", 0.5)]
    keyword = [("c", 8.0), ("a", 2.0)]
    fused = dict(weighted([dense, keyword], weights=[1.0, 0.5]))
    assert fused["a"] == pytest.approx(1.0 + 0.5 * 0.0)
    assert fused["b"] == pytest.approx(0.5)
    assert fused["c"] == pytest.approx(0.0 + 0.5 * 1.0)
    # weight 0 switches a side off entirely
    assert [i for i, _ in weighted([dense, keyword], weights=[1.0, 0.0])] == ["a", "b", "c"]


def test_weighted_groups_give_a_document_the_best_of_its_chunks_on_each_side() -> None:
    # doc "x" has chunk x1 (the dense side's best) and x2 (the keyword side's best);
    # chunk "y" is second on both sides.  Per chunk, y wins; per document, x does.
    dense = [("x1", 0.9), ("y", 0.8), ("z", 0.1), ("x2", 0.0)]
    keyword = [("x2", 10.0), ("y", 8.0), ("z", 0.0), ("x1", 0.0)]
    per_chunk = weighted([dense, keyword])
    assert per_chunk[0][0] == "y"
    groups = {"x1": "x", "x2": "x", "y": "y", "z": "z"}
    fused = weighted([dense, keyword], groups=groups)
    assert [i for i, _ in fused][:2] == ["x1", "y"]
    scores = dict(fused)
    # the leader carries the group: max dense (1.0) + max keyword (1.0)
    assert scores["x1"] == pytest.approx(2.0)
    # the other chunk keeps its own score (dense 0.0 + keyword 1.0), below its leader
    assert scores["x2"] == pytest.approx(1.0)
    assert scores["y"] == pytest.approx(0.8 / 0.9 + 0.8)
    # weights apply to the group evidence as to the items
    half = dict(weighted([dense, keyword], weights=[1.0, 0.5], groups=groups))
    assert half["x1"] == pytest.approx(1.5)


def test_weighted_groups_of_one_change_nothing() -> None:
    rng = random.Random(11)
    for _ in range(100):
        ids = [f"c{i}" for i in range(12)]
        a = [(i, rng.random()) for i in rng.sample(ids, 8)]
        b = [(i, rng.random() * 20) for i in rng.sample(ids, 6)]
        w = [1.0, rng.random()]
        plain = weighted([a, b], weights=w)
        assert weighted([a, b], weights=w, groups={i: i for i in ids}) == plain
        # an id missing from the mapping is a group of its own
        assert weighted([a, b], weights=w, groups={"unrelated": "g"}) == plain


def test_weighted_groups_keep_every_item_once_and_leaders_first() -> None:
    rng = random.Random(5)
    for _ in range(100):
        ids = [f"c{i}" for i in range(15)]
        groups = {i: f"d{rng.randint(0, 4)}" for i in ids}
        a = [(i, rng.random()) for i in rng.sample(ids, 10)]
        b = [(i, rng.random()) for i in rng.sample(ids, 7)]
        fused = weighted([a, b], weights=[1.0, rng.random()], groups=groups)
        assert sorted(i for i, _ in fused) == sorted({i for i, _ in a} | {i for i, _ in b})
        first: dict[str, float] = {}
        for i, s in fused:
            g = groups[i]
            if g in first:
                assert s <= first[g] + 1e-12  # a sibling never outranks its leader
            else:
                first[g] = s


@pytest.mark.parametrize("bad", [[1.0], [1.0, -1.0], [1.0, math.nan]])
def test_bad_weights_are_refused(bad) -> None:
    with pytest.raises(ValueError):
        rrf([[("a", 1.0)], [("b", 1.0)]], weights=bad)
    with pytest.raises(ValueError):
        weighted([[("a", 1.0)], [("b", 1.0)]], weights=bad)
    with pytest.raises(ValueError):
        rrf([[("a", 1.0)]], k=-1)


def test_rrf_against_an_independent_computation_on_random_rankings() -> None:
    rng = random.Random(7)
    for _ in range(200):
        ids = [f"d{i}" for i in range(rng.randint(0, 12))]
        rankings = []
        for _ in range(rng.randint(1, 3)):
            picked = rng.sample(ids, rng.randint(0, len(ids))) if ids else []
            rankings.append([(i, rng.random()) for i in picked])
        k = rng.randint(1, 80)
        expected: dict[str, float] = {}
        for r in rankings:
            for pos, (i, _) in enumerate(r):
                expected[i] = expected.get(i, 0.0) + 1.0 / (k + pos + 1)
        got = rrf(rankings, k=k)
        assert dict(got) == pytest.approx(expected)
        scores = [s for _, s in got]
        assert scores == sorted(scores, reverse=True)
        # deterministic: the same input gives the same order
        assert got == rrf(rankings, k=k)
