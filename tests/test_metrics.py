import math

import numpy as np
import pytest
import scipy.sparse as sp

from rectune.models.metrics import candidate_recall, coverage, evaluate_ranking, novelty, random_floor, topn_metrics


def truth_matrix(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    data = [(u, i) for u, items in enumerate(rows) for i in items]
    r, c = zip(*data) if data else ((), ())
    return sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(rows), n_items))


def test_hand_computed_user():
    # Truth {2, 5, 7}; ranking 5, 1, 7, 3 → hits at ranks 1 and 3.
    metrics = topn_metrics(np.array([[5, 1, 7, 3]]), truth_matrix([[2, 5, 7]], 10), 4)
    assert metrics["precision"][0] == pytest.approx(2 / 4)
    assert metrics["recall"][0] == pytest.approx(2 / 3)
    assert metrics["f1"][0] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    dcg = 1 / math.log2(2) + 1 / math.log2(4)
    idcg = 1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert metrics["ndcg"][0] == pytest.approx(dcg / idcg)
    assert metrics["mrr"][0] == pytest.approx(1.0)
    assert metrics["hitrate"][0] == 1.0


def test_cutoff_ideal_dcg_and_late_first_hit():
    # One truth item at rank 3 of a cut-off list of 2 → no hit; at cutoff 3 → MRR 1/3.
    truth = truth_matrix([[9]], 10)
    ranked = np.array([[0, 1, 9]])
    at2, at3 = topn_metrics(ranked, truth, 2), topn_metrics(ranked, truth, 3)
    assert at2["hitrate"][0] == 0 and at2["mrr"][0] == 0 and at2["ndcg"][0] == 0 and at2["f1"][0] == 0
    assert at3["mrr"][0] == pytest.approx(1 / 3)
    assert at3["ndcg"][0] == pytest.approx((1 / math.log2(4)) / 1.0)


def test_empty_slots_never_hit_and_empty_truth_is_nan():
    truth = truth_matrix([[0], []], 5)
    metrics = topn_metrics(np.array([[-1, 0], [-1, -1]]), truth, 2)
    assert metrics["recall"][0] == 1.0 and metrics["mrr"][0] == pytest.approx(0.5)
    assert np.isnan(metrics["recall"][1])


def test_candidate_recall_floor_coverage_novelty():
    truth = truth_matrix([[1, 2], [3]], 6)
    assert candidate_recall(np.array([[1, 4, 5], [0, 1, 2]]), truth).tolist() == [0.5, 0.0]
    assert random_floor(3, 6, np.array([0, 3])).tolist() == [0.5, 1.0]
    assert coverage(np.array([[1, 2], [2, -1]]), 6) == pytest.approx(2 / 6)
    popularity = np.array([3.0, 0.0])
    expected = np.mean([-math.log2(4 / 5), -math.log2(1 / 5)])
    assert novelty(np.array([[0, 1]]), popularity, 4) == pytest.approx(expected)


def test_evaluate_ranking_groups_average_their_users():
    truth = truth_matrix([[0], [1], [2], []], 4)
    ranked = np.array([[0, 3], [3, 1], [3, 3], [0, 1]])
    result = evaluate_ranking(np.arange(4), ranked, truth, (1, 2), item_popularity=np.ones(4), n_masked=np.zeros(4, int),
                              candidates=ranked, group_codes=np.array([0, 0, 1, 1]), group_labels=("a", "b"))
    assert result.overall["users"] == 3  # the user without held-out items is not evaluated
    assert result.overall["recall@1"] == pytest.approx(1 / 3)
    assert result.groups["a"]["recall@2"] == pytest.approx(1.0)
    assert result.groups["b"]["recall@2"] == pytest.approx(0.0)
    assert result.groups["b"]["users"] == 1
    assert result.overall["candidate_recall@2"] == pytest.approx(2 / 3)
    assert result.overall["candidate_recall_floor@2"] == pytest.approx(0.5)


def test_ndcg_caps_the_ideal_at_n_when_more_items_are_held_out():
    # Five held-out items, cutoff 2: the ideal list has two hits, not five, so a perfect top 2 scores 1.
    truth = truth_matrix([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]], 10)
    ranked = np.array([[0, 1, 9], [9, 0, 1]])
    at2 = topn_metrics(ranked, truth, 2)
    assert at2["ndcg"][0] == pytest.approx(1.0)
    second = 1 / math.log2(3)  # one hit, at rank 2
    assert at2["ndcg"][1] == pytest.approx(second / (1 + 1 / math.log2(3)))
    assert at2["recall"][0] == pytest.approx(2 / 5) and at2["precision"][0] == pytest.approx(1.0)
    # At 3 the ideal holds three hits; the list still has only two.
    at3 = topn_metrics(ranked, truth, 3)
    assert at3["ndcg"][0] == pytest.approx((1 + 1 / math.log2(3)) / (1 + 1 / math.log2(3) + 1 / math.log2(4)))


def test_group_f1_is_the_mean_of_per_user_f1_not_f1_of_the_means():
    # User 0: 1 hit of 1 held out at N=2 → P 1/2, R 1, F1 2/3. User 1: 1 hit of 4 → P 1/2, R 1/4, F1 1/3.
    truth = truth_matrix([[0], [1, 2, 3, 4]], 6)
    ranked = np.array([[0, 5], [1, 5]])
    result = evaluate_ranking(np.arange(2), ranked, truth, (2,), item_popularity=np.ones(6), n_masked=np.zeros(2, int),
                              group_codes=np.array([0, 0]), group_labels=("g",))
    group = result.groups["g"]
    assert group["f1@2"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    mean_p, mean_r = group["precision@2"], group["recall@2"]
    assert (mean_p, mean_r) == (pytest.approx(0.5), pytest.approx(5 / 8))
    assert group["f1@2"] != pytest.approx(2 * mean_p * mean_r / (mean_p + mean_r))  # 0.5, not 0.5556
    assert result.per_user["f1@2"].tolist() == pytest.approx([2 / 3, 1 / 3])
