"""evaluation.metrics: metric names, the report's names accepted, ADM's order kept."""

from __future__ import annotations

import pytest

from evaluation.errors import EvaluationError
from evaluation.metrics import format_report, parse_metrics


def test_report_names_are_accepted():
    assert parse_metrics("precision,recall") == ["prec", "recall"]
    assert parse_metrics("sfid, inception_score,FID") == ["is", "fid", "sfid"]
    assert parse_metrics("recall,prec,is") == ["is", "prec", "recall"]  # ADM's order, whatever the input's


def test_unknown_metric_is_one_line():
    with pytest.raises(EvaluationError) as err:
        parse_metrics("fid,kid")
    assert "unknown kid" in str(err.value) and "precision" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(EvaluationError, match="empty list"):
        parse_metrics(" , ")


def test_format_report_leaves_out_what_is_missing():
    report = {"inception_score": None, "fid": 2.5, "precision": 0.75}
    assert format_report(report, ["is", "fid", "prec"]) == ["FID: 2.5", "Precision: 0.75"]
