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


@pytest.mark.parametrize("protocol", [0, 2])
def test_cifar_batch_pickled_by_python3_with_an_old_protocol(tmp_path, protocol):
    """A valid batch re-pickled by Python 3 with protocol 0-2 (its bytes become
    _codecs.encode(str, 'latin1')) was refused as 'not a readable CIFAR-10 batch'."""
    from ntkcore._formats import read_cifar_batch
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
    batch = {b"batch_label": b"training batch 1 of 5", b"labels": [0, 1, 2, 3, 4, 9],
             b"data": data, b"filenames": [b"a.png"] * 6}
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    got, labels = read_cifar_batch(path)
    assert np.array_equal(got, data) and labels.tolist() == [0, 1, 2, 3, 4, 9]


@pytest.mark.parametrize("content", ['[{"my": "log"}]', "42", '"a note"'])
def test_someone_elses_run_json_is_never_replaced(tmp_path, content):
    """A run.json that parses as JSON but not as an object was called a damaged ntkcore
    manifest, and --overwrite replaced it; a foreign JSON object was already refused."""
    out = tmp_path / "dir"
    out.mkdir()
    (out / "run.json").write_text(content)
    for extra in ([], ["--overwrite"]):
        res = invoke("spectrum", "--out", out, *extra)
        one_line_error(res, "not an ntkcore run manifest")
        assert (out / "run.json").read_text() == content
    assert json.loads(content) is not None


@pytest.mark.parametrize("probes", ["99999999999999999999", "100000000"])
def test_absurd_diag_probes_are_refused_before_training(tmp_path, probes):
    """--diag-probes 1e20 ran out of memory (killed, exit 137, no message) listing its probe
    blocks after training; 1e8 on n = 200 ran for minutes."""
    res = invoke("influence", "--n-train", "200", "--width", "8", "--epochs", "1",
                 "--solver", "exact", "--diag-probes", probes, "--out", tmp_path / "o", "--quiet")
    one_line_error(res, "diag_probes", "65536")
    assert not (tmp_path / "o" / "model.pt").exists(), "refused only after training"
