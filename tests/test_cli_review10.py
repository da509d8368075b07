"""CLI edge cases found in the session-10 review; each test failed before its fix."""

import json
import pickle

import numpy as np
import pytest

from test_cli import invoke, one_line_error


@pytest.mark.parametrize("command", ["influence", "distance", "malleability"])
def test_huge_epochs_is_one_line_before_any_work(tmp_path, command):
    """--epochs 1e20 printed 'internal error: OverflowError' from inside the progress bar,
    after the data had been loaded."""
    res = invoke(command, "--epochs", "99999999999999999999", "--out", tmp_path / "o")
    one_line_error(res, "epochs", "at most")
    assert res.exit_code == 2
