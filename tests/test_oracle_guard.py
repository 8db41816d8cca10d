"""`CI=true` turns a missing oracle's skip into a failure (tests/oracle_guard.py)."""

import pytest

pytest_plugins = ["pytester"]

MISSING_IN_TEST = """
import pytest

def test_needs_oracle():
    pytest.importorskip("keras_gemma_no_such_oracle")

def test_other_skip():
    pytest.skip("not an oracle")
"""

MISSING_AT_MODULE = """
import pytest

pytest.importorskip("keras_gemma_no_such_oracle")

def test_never_runs():
    pass
"""


@pytest.mark.parametrize("ci", ["true", ""])
def test_missing_oracle_fails_only_in_ci(pytester, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    pytester.makepyfile(test_in_test=MISSING_IN_TEST, test_at_module=MISSING_AT_MODULE)
    result = pytester.runpytest_inprocess(
        "-p", "oracle_guard", "-p", "no:cacheprovider", "--continue-on-collection-errors"
    )
    if ci:
        # The oracle skips fail; a skip for another reason stays a skip.
        result.assert_outcomes(failed=1, skipped=1, errors=1)
        result.stdout.fnmatch_lines(["*test oracle is missing*keras_gemma_no_such_oracle*"])
    else:
        result.assert_outcomes(skipped=3)
