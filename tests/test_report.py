"""The paper pipeline's configuration and the report's BEIR averaging, missing cells and sweep table."""

import numpy as np
import pandas as pd
import pytest

from corexp.report.tables import BEIR_15, CQA_FORUMS, build_tables, missing_cells, sweep_table

from helpers import build_job, compose_cfg


def test_paper_core_resolves_to_the_papers_setting():
    cfg = compose_cfg(["experiment=paper_core"], return_hydra_config=True)
    assert cfg.first_stage._target_.endswith(".Dense") and cfg.first_stage.encoder.hf_id == "ibm-granite/granite-embedding-30m-english"
    assert cfg.first_stage.depth == 40 and cfg.prompt.max_words == 300 and cfg.prompt.name == "core_official"
    det = cfg.detection
    assert (det.name, det.num_queries, det.num_negatives, det.positions) == ("nq-train", 1000, 49, 5)
    params = cfg.hydra.sweeper.params
    assert params.model == "mistral,llama,granite" and params.heads == "all,qr_r,core"
    data = params.data.split(",")
    groups = {"cqadupstack" if d.startswith("cqadupstack-") else d for d in data}
    assert len(groups) == 17 and groups == set(BEIR_15) | {"dl19", "dl20"}
    assert sorted(d.split("-", 1)[1] for d in data if d.startswith("cqadupstack-")) == sorted(CQA_FORUMS)
    for d in data:  # every data option exists and composes
        assert compose_cfg([f"data={d}"]).data.name == d or d == "cqadupstack"


def _row(model, method, dataset, value, fs=0.5, metric="core", extra=None, key=None):
    params = {"heads.name": metric, "heads.k": "8", "model.tau": "0.1", "data.name": dataset, "model.name": model,
              **(extra or {})}
    return {"run_id": "none", "run_name": f"{model} · {method}", "start": 0, "model": model, "dataset": dataset,
            "method": method, "first_stage": "BM25", "params": params,
            "key": key,
            "metrics": {"rerank.nDCG_at_10": value, "first_stage.nDCG_at_10": fs}, "queries": 10.0}


def test_beir_average_counts_cqadupstack_forums_as_one_set():
    rng = np.random.default_rng(0)
    sets = [d for d in BEIR_15 if d != "cqadupstack"] + [f"cqadupstack-{f}" for f in CQA_FORUMS] + ["dl19"]
    values = {d: float(rng.uniform(0.2, 0.8)) for d in sets}
    df = pd.DataFrame([_row("m", "CoRe-k8 τ=0.1", d, v) for d, v in values.items()])
    table = build_tables(df, "nDCG@10")["m"]
    cqa = np.mean([values[f"cqadupstack-{f}"] for f in CQA_FORUMS])
    assert table.loc["CoRe-k8 τ=0.1", "cqadupstack"] == f"{100 * cqa:.1f}"
    beir = np.mean([values[d] for d in BEIR_15 if d != "cqadupstack"] + [cqa])  # 15 numbers, the forums as one
    assert table.loc["CoRe-k8 τ=0.1", "BEIR-15"] == f"{100 * beir:.1f}"
    assert table.loc["BM25", "BEIR-15"] == "50.0" and "dl19" in table.columns
    # one forum short: no cqadupstack number, hence no BEIR-15 average (never a partial one)
    short = build_tables(df[df.dataset != "cqadupstack-tex"], "nDCG@10")["m"]
    assert short.loc["CoRe-k8 τ=0.1", "cqadupstack"] == "" and short.loc["CoRe-k8 τ=0.1", "BEIR-15"] == ""


def test_missing_cells_are_listed():
    df = pd.DataFrame([_row("a", "ICR", "dl19", .4, metric="all"), _row("a", "CoRe-k8", "dl19", .5),
                       _row("b", "ICR", "dl19", .3, metric="all")])
    assert missing_cells(df) == ["b × CoRe-k8 × dl19"]
    assert missing_cells(df, ["a,b,c:dl19", "a:nq"]) == ["a × CoRe-k8 × nq", "a × ICR × nq", "b × CoRe-k8 × dl19",
                                                        "c × CoRe-k8 × dl19", "c × ICR × dl19"]


def test_sweep_table_is_relative_to_no_truncation():
    """Lines are named by the method's label from the run's keys without the swept setting."""
    rows = []
    for frac, ndcg, lat, mem, kept in ((0.0, .5, 2.0, 400, 30), (0.5, .45, 1.0, 200, 15)):
        key = build_job(["heads=core", "truncation=fraction", f"truncation.fraction={frac}"]).run_key()
        r = _row("m", "x", "dl19", ndcg, extra={"truncation.name": "fraction", "truncation.fraction": str(frac)}, key=key)
        r["metrics"].update(latency_mean_s=lat, peak_memory_mb=mem, kept_layers=kept)
        rows.append(r)
    t = sweep_table(pd.DataFrame(rows), "truncation.fraction", "nDCG@10")
    assert list(t["kept_layers"]) == [30, 15] and set(t["method"]) == {"CoRe-k8 τ=0.1 [trunc=fraction]"}
    assert list(t["latency_s rel."]) == [1.0, 0.5] and list(t["nDCG@10 rel."]) == pytest.approx([1.0, 0.9])


def test_holm_agrees_with_independent_computations():
    from statsmodels.stats.multitest import multipletests

    from corexp.report.tables import holm

    # by hand: sorted p 0.005, 0.01, 0.03, 0.04 -> 4p, 3p, 2p, 1p = 0.02, 0.03, 0.06, 0.04 -> running max, capped at 1
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005}) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06, "d": 0.02})
    rng = np.random.default_rng(3)
    for n in (1, 2, 5, 17):
        p = rng.uniform(0, 0.2, size=n)
        ours = holm({i: float(v) for i, v in enumerate(p)})
        assert [ours[i] for i in range(n)] == pytest.approx(multipletests(p, method="holm")[1])


def _store_with_runs(tmp_path, tables):
    """A real MLflow store: one run per (name, per-query table or None), and the report's rows for them."""
    import mlflow

    from corexp.tracking.tracker import Store

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/m.db")
    exp = mlflow.create_experiment("x", artifact_location=(tmp_path / "art").as_uri())
    rows = []
    for name, table in tables:
        with mlflow.start_run(experiment_id=exp, run_name=name) as run:
            if table is not None:
                table.to_csv(tmp_path / "per_query.csv", index=False)
                mlflow.log_artifact(str(tmp_path / "per_query.csv"))
        row = _row("m", f"{name}-method", "dl19", .5)
        rows.append({**row, "run_id": run.info.run_id, "run_name": name, "queries": 3.0})
    return Store(f"sqlite:///{tmp_path}/m.db"), pd.DataFrame(rows)


def test_runs_whose_per_query_table_is_missing_cut_or_lacks_the_measure_are_named_not_used(tmp_path):
    good = pd.DataFrame({"query_id": ["1", "2", "3"], "first_stage.nDCG_at_10": [.1, .2, .3], "rerank.nDCG_at_10": [.4, .5, .7]})
    repeated = pd.concat([good.head(2), good.head(1)])  # three rows, as many as queries, but query 1 twice
    store, df = _store_with_runs(tmp_path, [("good", good), ("broken", None), ("cut", good.head(2)),
                                            ("other", good.rename(columns={"rerank.nDCG_at_10": "rerank.RR"})),
                                            ("twice", repeated)])
    unreadable = []
    table = build_tables(df, "nDCG@10", unreadable=unreadable, store=store)["m"]
    said = "\n".join(unreadable)
    assert len(unreadable) == 4, said
    assert "twice (" in said and "lists query 1 2 times" in said
    assert "broken (" in said and "per_query.csv missing" in said
    assert "cut (" in said and "has 2 queries, the run evaluated 3" in said
    assert "other (" in said and "has no column rerank.nDCG_at_10" in said
    assert set(table.index) >= {"good-method", "broken-method", "cut-method", "other-method", "BM25"}


def test_seed_draws_are_a_distribution_not_one_row(tmp_path):
    """Five random-head draws of one cell: mean ± sd [min–max], n=5 — never the last draw alone."""
    draws = [.33, .35, .375, .36, .34]
    rows = [{**_row("m", "random-k8", "dl19", v, metric="random", extra={"heads.seed": str(i)}), "config_hash": f"c{i}"}
            for i, v in enumerate(draws)]
    table = build_tables(pd.DataFrame(rows), "nDCG@10")["m"]
    v = 100 * np.array(draws)
    assert table.loc["random-k8", "dl19"] == f"{v.mean():.1f} ± {v.std(ddof=1):.1f} [{v.min():.1f}–{v.max():.1f}], n=5"


def test_the_report_prefers_the_current_codes_run_and_names_older_code(tmp_path):
    """A config run by edited code, then by the current code (after a revert): the current code's run is used even
    though it is older; a config with only older-code runs is used and named."""
    import mlflow

    from corexp.report.tables import load_runs
    from corexp.tracking.identity import code_digest
    from corexp.tracking.tracker import Store

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/m.db")
    exp = mlflow.create_experiment("x", artifact_location=(tmp_path / "art").as_uri())
    params = {d: build_job(["heads=all", f"data={d}"]).run_key().params() for d in ("dl19", "dl20")}
    for name, chash, code, value in (("current", "a", code_digest(), .5), ("edited", "a", "0123abcd", .9),
                                     ("only-old", "b", "0123abcd", .4)):
        with mlflow.start_run(experiment_id=exp, run_name=name):
            mlflow.set_tags({"config_hash": chash, "code_digest": code})
            mlflow.log_params(params["dl19" if chash == "a" else "dl20"])
            mlflow.log_metric("rerank.nDCG_at_10", value)
    df = load_runs(Store(f"sqlite:///{tmp_path}/m.db"), ["x"])
    assert set(zip(df["model"], df["method"], df["dataset"])) == {("smollm2", "ICR", "dl19"), ("smollm2", "ICR", "dl20")}
    got = dict(zip(df["run_name"], df["code"]))
    assert got == {"current": "current", "only-old": "0123abcd"}
    assert df.attrs["older_code"] == [f"only-old: from code 0123abcd (no run of the current code {code_digest()})"]


def test_runs_of_an_older_corexp_are_keyed_by_the_migration(tmp_path, capsys):
    """A run logged before component keys (no key.* params, an identity of the old formula, a label without its
    detection data) is refused by the report in one line naming the migration; `python -m corexp.migrate` rebuilds its
    job from the logged config: the run then carries the job's keys and the report labels it with its detection data;
    its identity is kept (tables stay as they were) unless --identity re-keys it to the one a new job of the same
    config claims (so a rerun finds it). A second migration changes nothing."""
    import mlflow

    from corexp.errors import CorexpError
    from corexp.migrate import main as migrate
    from corexp.report.tables import load_runs
    from corexp.tracking.tracker import Store

    job = build_job(["heads=core", "detection=scifact_train", "detection.fold=1"])
    uri = f"sqlite:///{tmp_path}/m.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("old", artifact_location=(tmp_path / "art").as_uri())
    fingerprint = "0f0f0f0f0f0f0f0f"  # the logged content fingerprint of its data (not recomputed)
    with mlflow.start_run(experiment_id=exp, run_name="smollm2 · CoRe-k8 τ=0.1 · trunc=auto · scifact-sample") as run:
        mlflow.set_tags({"config_hash": "oldformula", "code_digest": "0123abcd", "data_fingerprint": fingerprint,
                         "method_label": "CoRe-k8 τ=0.1 [trunc=auto]"})
        mlflow.log_params({"seed": "0", "heads.name": "core", "heads.tau": "None"})
        mlflow.log_text(job.config_text, "config.yaml")
        mlflow.log_metric("rerank.nDCG_at_10", 0.5)
    with pytest.raises(CorexpError, match=r"no component keys.*python -m corexp.migrate --experiment old"):
        load_runs(Store(uri), ["old"])
    # runs whose settings changed meaning since are left alone, named: the old heads=qrhead (it computed QR-R) and a
    # config that builds into other settings than the run logged
    for name, overrides, params in (("old-qrhead", ["heads=qrhead"], {"heads.name": "qrhead"}),
                                    ("changed", ["heads=core", "heads.k=4"], {"heads.name": "core", "heads.k": "8"})):
        with mlflow.start_run(experiment_id=exp, run_name=name):
            mlflow.set_tags({"config_hash": "x", "data_fingerprint": fingerprint})
            mlflow.log_params({"seed": "0", **params})
            mlflow.log_text(build_job(overrides).config_text, "config.yaml")
    assert migrate(["--experiment", "old", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "left alone: old-qrhead" in out and "rerun it as heads=qr_r" in out
    assert "left alone: changed" in out and "heads.k: 8 -> 4" in out and "done: 1 keyed, 2 left alone" in out
    for r in Store(uri).finished_runs(["old"]):
        if r.name in ("old-qrhead", "changed"):
            mlflow.delete_run(r.run_id)
    assert "label: CoRe-k8 τ=0.1 [trunc=auto] -> CoRe-k8 τ=0.1 [trunc=auto, detected on scifact-train (fold=1)]" in out
    stored = next(r for r in Store(uri).finished_runs(["old"]) if r.run_id == run.info.run_id)
    assert stored.run_id == run.info.run_id
    assert {k: v for k, v in stored.params.items() if k.startswith("key.")} == {
        k: v for k, v in job.run_key().params().items() if k.startswith("key.")}
    assert stored.tags["config_hash"] == "oldformula" and stored.params["heads.tau"] == "None"
    df = load_runs(Store(uri), ["old"])
    assert list(df["method"]) == ["CoRe-k8 τ=0.1 [trunc=auto, detected on scifact-train (fold=1)]"]
    assert migrate(["--experiment", "old", "--tracking-uri", uri]) == 0
    assert "done: 1 up to date" in capsys.readouterr().out
    # --identity: the identity a job of this config claims (the key params come back the same)
    from corexp.migrate import rekey

    params, tags, _ = rekey(Store(uri), stored)
    assert tags["config_hash"] == job.run_key().identity_of(fingerprint, "any").config_hash
    assert tags["config_hash.before_keys"] == "oldformula" and params == {
        k: v for k, v in stored.params.items() if k.startswith("key.")}


def test_reading_never_creates_a_store_and_an_unlogged_measure_is_one_line(tmp_path):
    from corexp.errors import CorexpError
    from corexp.report.tables import check_measure, main
    from corexp.tracking.tracker import Store

    with pytest.raises(CorexpError, match="no MLflow store at"):
        Store(f"sqlite:///{tmp_path}/typo.db")
    assert not (tmp_path / "typo.db").exists()
    assert main(["--tracking-uri", f"sqlite:///{tmp_path}/typo.db", "--out", str(tmp_path / "r.md")]) == 2
    assert not (tmp_path / "typo.db").exists()
    df = pd.DataFrame([{**_row("m", "ICR", "dl19", .5), "params": {"data.measures": '["nDCG@10", "RR"]'}}])
    with pytest.raises(CorexpError, match=r"measure P@5 was not logged by these runs; logged: RR, nDCG@10"):
        check_measure(df, "P@5")
