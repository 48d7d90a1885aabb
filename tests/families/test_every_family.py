"""The generic family suite (``suite.py``) on every registered family: a family is one file plus its fixture.

One pairs -> reflow -> export run per family (module scope), then each check of the suite on it."""

from __future__ import annotations

import pytest
from suite import CHECKS, run_family

from instaflow_pl.families import FAMILIES


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_run(request, tmp_path_factory):
    return run_family(request.param, tmp_path_factory.mktemp(f"family-{request.param}"))


@pytest.mark.parametrize("check", list(CHECKS))
def test_family_suite(family_run, check, tmp_path):
    CHECKS[check](family_run, tmp_path)
