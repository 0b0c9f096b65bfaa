"""The prepare / generate-data report: input == written + skipped, or a loud error."""

import pytest

from llava_ray.data.report import ReportImbalanceError, check_balance


def test_report_balance_check_names_what_vanished():
    balanced = {"input": 3, "written": 2, "skipped": {"missing_image": 1}, "sources": {}}
    check_balance(balanced)
    broken = {
        "input": 3,
        "written": 1,
        "skipped": {},
        "by_type": {"detail": {"input": 1, "written": 1, "skipped": {}}},
    }
    with pytest.raises(
        ReportImbalanceError,
        match=r"generate report does not balance, requests vanished.*"
        r"total: input 3 != written 1 \+ skipped 0",
    ):
        check_balance(broken, parts="by_type", job="generate", unit="requests")
