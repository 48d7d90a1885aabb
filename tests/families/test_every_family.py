"""The generic family suite (``suite.py``) on every registered family: a family is one file plus its fixture."""

from __future__ import annotations

import pytest
from suite import run_suite

from instaflow_pl.families import FAMILIES


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_suite(name, tmp_path, capsys):
    run_suite(name, tmp_path, capsys)
