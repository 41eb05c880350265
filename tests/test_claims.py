import pytest

from ge_utils.claims import ClaimReport, parse_verdicts


def test_report_round_trips_through_text():
    report = ClaimReport()
    report.guaranteed("margin grows to first order", True, "500/500 pairs")
    report.empirical("chosen falls with a long suffix", False, "mean change +0.31 nats")
    parsed = parse_verdicts("noise\n" + str(report) + "\nmore noise")
    assert parsed == report.to_records()
    assert report.all_guaranteed_hold


def test_report_rejects_bad_kind_and_parenthesized_evidence():
    report = ClaimReport()
    with pytest.raises(ValueError, match="kind"):
        report.check("maybe", "x", True, "1")
    with pytest.raises(ValueError, match="parentheses"):
        report.guaranteed("x", True, "3 (of 4)")
