"""The experiment commands end to end on digits with tiny settings, and the attack path."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ntkcore.cli.experiments_cmds import distance, malleability, spectrum


@pytest.fixture(scope="module")
def tiny():
    from ntkcore.data import load_dataset
    from ntkcore.experiments.pipeline import train_network

    ds = load_dataset("digits", n_train=60, n_test=20, seed=0)
    models = {a: train_network(ds, a, 16, epochs=3, seed=0, progress=False)[0]
              for a in ("relu", "attn")}
    return ds, models


@pytest.mark.parametrize("attack", ["fgsm", "pgd", "mim"])
@pytest.mark.parametrize("arch", ["relu", "attn"])
def test_attacks_stay_in_the_box_and_raise_the_loss(tiny, arch, attack):
    from ntkcore.experiments.malleability import attack_pixels

    ds, models = tiny
    eps = 0.1
    adv, st = attack_pixels(models[arch], ds, attack, eps=eps, step=0.01, iters=10)
    P = ds.pixels_train
    # float64 pixels and projection: exact up to one rounding of x +- eps
    assert np.max(np.abs(adv - P)) <= eps + 1e-12
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert st["max_abs_delta"] > 0
    if attack != "fgsm":  # iterative ascent on the summed loss: must go up
        assert st["loss_after"] > st["loss_before"]


def test_attention_is_recomputed_then_restored(tiny):
    """Gram coupling: MLP-Attn scores on a perturbed set use M' = X'^T X', then M comes back."""
    from ntkcore.experiments.malleability import _Scorer, replace_training

    ds, models = tiny
    model = models["attn"]
    F0 = model.features_numpy(ds.X_test)
    s = {"retrain": False, "lam": 1e-3, "device": "cpu", "width": 16, "epochs": 1, "seed": 0}
    scorer = _Scorer(model, ds, s, np.arange(2), None, False)
    px = ds.pixels_train.copy()
    px[0] = 1.0 - px[0]  # change one training point only
    I1 = scorer(replace_training(ds, pixels=px))
    I0 = scorer(ds)
    np.testing.assert_array_equal(model.features_numpy(ds.X_test), F0)
    # every slot's score moves (not only slot 0): the attention couples all points
    assert np.all(np.abs(I1[:, 1:] - I0[:, 1:]) > 0)


def test_ntk_predictor_matches_reference():
    from ntkcore.experiments.distance import ntk_predictor
    from reference import krr_fit_predict, relu_ntk_infinite_naive

    rng = np.random.default_rng(0)
    F, Ft, Y = rng.standard_normal((15, 4)), rng.standard_normal((5, 4)), rng.standard_normal((15, 2))
    got = ntk_predictor(F, Y, Ft, 1e-2)
    want = krr_fit_predict(relu_ntk_infinite_naive(F), Y, relu_ntk_infinite_naive(Ft, F), 1e-2)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def test_malleability_command_end_to_end(tmp_path):
    out = tmp_path / "m"
    r = _ok(CliRunner().invoke(malleability, [
        "--n-train", "60", "--n-test", "30", "--test-points", "3", "--width", "16",
        "--epochs", "2", "--iters", "3", "--topk", "5", "--seed", "1", "--quiet",
        "--out", str(out)]))
    assert "Table 2 layout" in r.output
    for f in ("table.md", "results.json", "scores.npz", "fig2a_flip_rate.png",
              "fig2b_spearman.png", "fig4_complexity_relu_standard.png",
              "fig4_complexity_attn_standard.png"):
        assert (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    assert [run["arch"] for run in res["runs"]] == ["relu", "attn"]
    for run in res["runs"]:
        for iv in run["interventions"].values():
            for summ in iv.values():
                assert all(0.0 <= v <= 1.0 for v in summ["flip_rate"]["values"])
                assert all(-1.0 <= v <= 1.0 for v in summ["spearman"]["values"])
        assert run["intrinsic"]["S"] > 0
    assert np.load(out / "scores.npz")["relu_standard"].shape == (3, 60)
    # refuses to overwrite
    r = CliRunner().invoke(malleability, ["--n-train", "60", "--out", str(out), "--quiet"])
    assert r.exit_code == 2 and "overwrite" in r.output


def test_malleability_bad_input_is_one_line():
    r = CliRunner().invoke(malleability, ["--attacks", "fgsm,cw", "--quiet", "--out", "/nonexistent/x"])
    assert r.exit_code == 2
    assert r.output.strip().count("\n") == 0 and r.output.startswith("error: attacks")


def test_distance_command_end_to_end(tmp_path):
    out = tmp_path / "d"
    r = _ok(CliRunner().invoke(distance, [
        "--n-train", "60", "--n-test", "30", "--max-width", "8", "--epochs", "2", "--quiet",
        "--out", str(out)]))
    assert "m=4" in r.output and "m=8" in r.output
    res = json.loads((out / "results.json").read_text())
    assert res["widths"] == [4, 8]
    for arch in ("relu", "attn"):
        assert all(np.isfinite(w["distance"]) and w["distance"] > 0
                   for w in res["archs"][arch]["widths"])
    assert (out / "fig1_ntk_distance.png").stat().st_size > 0
    r = CliRunner().invoke(distance, ["--max-width", "100", "--quiet", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and r.output.startswith("error: max_width")
    assert r.output.strip().count("\n") == 0


def test_spectrum_command_end_to_end(tmp_path):
    out = tmp_path / "s"
    _ok(CliRunner().invoke(spectrum, ["--classes", "3,8", "--n-train", "30", "--quiet",
                                      "--out", str(out)]))
    res = json.loads((out / "results.json").read_text())
    rep = res["report"]
    assert rep["full_rank"] and rep["n"] == 30 and rep["d"] == 64
    assert rep["full_rank_check"]["relative_difference"] < 1e-4
    assert (out / "spectrum.png").stat().st_size > 0 and (out / "table.md").exists()
    r = CliRunner().invoke(spectrum, ["--dataset", "imagenet", "--quiet",
                                      "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and r.output.startswith("error: dataset")
    assert r.output.strip().count("\n") == 0


def test_interrupted_malleability_resumes_without_redoing_finished_runs(tmp_path,
                                                                        monkeypatch):
    """Stopped during its second run, the experiment keeps the first; the same command then
    resumes (one evaluation, not two) and gives the results of an uninterrupted run."""
    import json

    import ntkcore.experiments.malleability as mm
    from ntkcore.errors import OutputExistsError
    real = mm.evaluate_model
    calls = []

    def second_arch_fails(model, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, *a, **kw)

    monkeypatch.setattr(mm, "evaluate_model", second_arch_fails)
    cfg = mm.MalleabilityConfig(n_train=60, n_test=10, test_points=2, width=16, epochs=1,
                                attacks=("fgsm",), interventions=("transformed",))
    quiet = dict(progress=False, log=lambda *a: None)
    with pytest.raises(KeyboardInterrupt):
        mm.run_malleability(cfg, tmp_path / "o", **quiet)
    manifest = json.loads((tmp_path / "o" / "run.json").read_text())
    assert manifest["complete"] is False and list(manifest["stages"]) == ["relu_standard"]
    # other settings: refused, naming what differs; the finished run is kept
    other = mm.MalleabilityConfig(**{**cfg.__dict__, "width": 8})
    with pytest.raises(OutputExistsError, match="width"):
        mm.run_malleability(other, tmp_path / "o", **quiet)
    calls.clear()
    monkeypatch.setattr(mm, "evaluate_model", lambda *a, **kw: (calls.append(1),
                                                                real(*a, **kw))[1])
    resumed = mm.run_malleability(cfg, tmp_path / "o", **quiet)
    assert len(calls) == 1  # only the unfinished attention run
    fresh = mm.run_malleability(cfg, tmp_path / "fresh", **quiet)

    def written(folder):  # results.json without the clocks
        res = json.loads((folder / "results.json").read_text())
        res.pop("seconds")
        for r in res["runs"]:
            r.pop("timings")
        return res
    out = tmp_path / "o"
    assert written(out) == written(tmp_path / "fresh")
    assert resumed["table"] == fresh["table"]
    assert not list(out.glob("partial_*")) and json.loads((out / "run.json").read_text())[
        "complete"] is True
    assert (out / "fig4_complexity_relu_standard.png").exists()  # drawn from resumed deciles
    # --overwrite with fewer architectures leaves no figure of the old run behind
    mm.run_malleability(mm.MalleabilityConfig(**{**cfg.__dict__, "archs": ("attn",)}), out,
                        overwrite=True, **quiet)
    assert not (out / "fig4_complexity_relu_standard.png").exists()


def test_interrupted_distance_resumes_at_the_first_unfinished_width(tmp_path, monkeypatch):
    import json

    import ntkcore.experiments.distance as dist
    import ntkcore.experiments.pipeline as pl
    real = pl.train_network
    widths = []

    def train(ds, arch, m, **kw):
        widths.append(m)
        if len(widths) == 3:
            raise KeyboardInterrupt
        return real(ds, arch, m, **kw)

    monkeypatch.setattr(pl, "train_network", train)
    cfg = dist.DistanceConfig(archs=("relu",), min_width=4, max_width=32, epochs=1, n_train=60,
                              n_test=10)
    quiet = dict(progress=False, log=lambda *a: None)
    with pytest.raises(KeyboardInterrupt):
        dist.run_distance(cfg, tmp_path / "o", **quiet)
    assert list(json.loads((tmp_path / "o" / "run.json").read_text())["stages"]) == [
        "relu_width4", "relu_width8"]
    widths.clear()
    res = dist.run_distance(cfg, tmp_path / "o", **quiet)
    assert widths == [16, 32]  # 4 and 8 were finished
    assert [r["width"] for r in res["archs"]["relu"]["widths"]] == [4, 8, 16, 32]
    from ntkcore.errors import ParameterError
    with pytest.raises(ParameterError, match="test point"):
        dist.run_distance(dist.DistanceConfig(**{**cfg.__dict__, "n_test": 0}), None, **quiet)


@pytest.mark.parametrize("field,value", [
    ("show", 2.5), ("top_k", 2.5), ("epochs", 2.5), ("epochs", True), ("seed", 2 ** 70),
    ("width", "16"), ("lam", 1e300), ("n_test", -1), ("seed", None)])
def test_influence_config_refuses_bad_values_before_any_work(field, value):
    from ntkcore.errors import ParameterError
    from ntkcore.experiments.pipeline import InfluenceConfig
    with pytest.raises(ParameterError, match=field):
        InfluenceConfig(**{field: value}).validate()


def test_adversarial_training_refuses_rows_it_would_ignore():
    import ntkcore as nc
    from ntkcore.errors import ParameterError
    from ntkcore.experiments.pipeline import train_network
    ds = nc.load_dataset("digits", classes="3,8", n_train=40, n_test=5)
    with pytest.raises(ParameterError, match="X_train"):
        train_network(ds, "relu", 8, epochs=1, adv_eps=0.1, X_train=ds.X_train[::-1],
                      progress=False)


def test_a_large_top_k_keeps_its_lists_but_not_a_huge_figure(tmp_path):
    import time

    from ntkcore.experiments.influence_run import FIGURE_MAX_K, run_influence
    from ntkcore.experiments.pipeline import InfluenceConfig
    cfg = InfluenceConfig(n_train=60, n_test=5, width=16, epochs=1, top_k=100, show=2)
    t0 = time.perf_counter()
    summary = run_influence(cfg, tmp_path / "o", progress=False, log=lambda *a: None)
    assert time.perf_counter() - t0 < 60  # 201 subplot columns per row took minutes
    top = summary["top_influences"][0]
    scores = np.load(tmp_path / "o" / "influence.npz")["scores"][0]
    # all n_train, capped at n, split by sign: helpful are the positive scores, largest first
    assert [e["train_position"] for e in top["helpful"]] == \
        list(np.argsort(-scores, kind="stable")[:(scores > 0).sum()])
    assert len(top["harmful"]) == (scores < 0).sum()
    assert all(e["score"] < 0 for e in top["harmful"])
    assert FIGURE_MAX_K < 60


def test_a_large_show_lists_every_point_but_draws_at_most_figure_max_rows(tmp_path):
    """--show 300: summary.json lists all 300 test points; the figure only the first
    FIGURE_MAX_ROWS (300 rows of subplots took minutes and made an image no viewer opens)."""
    import matplotlib.image

    from ntkcore.experiments.influence_run import FIGURE_MAX_ROWS, run_influence
    from ntkcore.experiments.pipeline import InfluenceConfig
    cfg = InfluenceConfig(n_train=60, n_test=300, width=16, epochs=1, top_k=2, show=300)
    summary = run_influence(cfg, tmp_path / "o", progress=False, log=lambda *a: None)
    assert [r["test_position"] for r in summary["top_influences"]] == list(range(300))
    height = matplotlib.image.imread(tmp_path / "o" / "influence_examples.png").shape[0]
    cfg2 = InfluenceConfig(n_train=60, n_test=300, width=16, epochs=1, top_k=2,
                           show=FIGURE_MAX_ROWS)
    run_influence(cfg2, tmp_path / "p", progress=False, log=lambda *a: None)
    assert height == matplotlib.image.imread(tmp_path / "p" / "influence_examples.png").shape[0]
    assert FIGURE_MAX_ROWS <= 20


def test_malleability_saves_every_perturbed_score_and_its_metrics_follow(tmp_path):
    """scores.npz holds I_orig and the scores after each intervention (Curated: NaN at the
    removed H_t), so results.json's flip rates and Spearman rho can be recomputed from it."""
    import json

    from scipy import stats

    from ntkcore.experiments.malleability import MalleabilityConfig, run_malleability
    from ntkcore.malleability import flip_rate, high_influence_set
    cfg = MalleabilityConfig(dataset="digits", classes="3,8", n_train=60, n_test=20,
                             test_points=3, archs=("relu",), attacks=("fgsm",), width=16, epochs=2,
                             topk=5)
    run_malleability(cfg, tmp_path / "m", progress=False, log=lambda *a: None)
    z = np.load(tmp_path / "m" / "scores.npz")
    res = json.loads((tmp_path / "m" / "results.json").read_text())["runs"][0]
    I0 = z["relu_standard"]
    for name in ("curated", "transformed_fgsm", "adversarial_fgsm"):
        assert z[f"relu_standard__{name}"].shape == I0.shape
    It, Ia = z["relu_standard__transformed_fgsm"], z["relu_standard__adversarial_fgsm"]
    flips = [flip_rate(I0[t], It[t], tau=0.1) for t in range(3)]
    assert np.mean(flips) == pytest.approx(
        res["interventions"]["transformed"]["fgsm"]["flip_rate"]["mean"], abs=1e-12)
    rho = [stats.spearmanr(I0[t], Ia[t])[0] for t in range(3)]
    assert np.mean(rho) == pytest.approx(
        res["interventions"]["adversarial"]["fgsm"]["spearman"]["mean"], abs=1e-12)
    Ic = z["relu_standard__curated"]
    for t in range(3):
        assert np.isnan(Ic[t, high_influence_set(I0[t], 0.1)]).all()


def test_helpful_and_harmful_lists_never_hold_the_wrong_sign(tmp_path):
    """At n_train = 3 with top_k = 5 both lists used to hold every point, negative scores
    listed as "helpful"."""
    from ntkcore.experiments.influence_run import run_influence
    from ntkcore.experiments.pipeline import InfluenceConfig
    cfg = InfluenceConfig(classes=(3, 8), n_train=3, n_test=3, width=8, epochs=1, top_k=5,
                          show=3)
    summary = run_influence(cfg, tmp_path / "o", progress=False, log=lambda *a: None)
    for row in summary["top_influences"]:
        helpful = {e["train_position"] for e in row["helpful"]}
        harmful = {e["train_position"] for e in row["harmful"]}
        assert not helpful & harmful
        assert all(e["score"] > 0 for e in row["helpful"])
        assert all(e["score"] < 0 for e in row["harmful"])
