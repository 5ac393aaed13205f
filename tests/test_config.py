from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from corexp.config import config_dir
from helpers import compose_cfg

CONF = config_dir()


def test_default_composes_to_the_offline_job():
    cfg = compose_cfg()
    assert cfg.model.name == "smollm2" and cfg.first_stage.depth == 20
    assert (cfg.heads.metric, cfg.heads.k, cfg.truncation.mode) == ("core", 8, "auto")  # the paper's method by default
    assert Path(cfg.data.local_dir).joinpath("qrels", "test.tsv").is_file()
    assert cfg.tracking.uri.startswith("sqlite:///") and Path(cfg.paths.root_dir).is_absolute()
    assert cfg.prompt.query_span_end == "query" and cfg.prompt.doc_order == "retriever"


@pytest.mark.parametrize("group", ["model", "data", "prompt", "heads", "truncation", "fusion", "first_stage", "detection"])
def test_every_option_of_every_group_composes(group):
    for f in sorted((CONF / group).glob("[!_]*.yaml")):
        cfg = compose_cfg([f"{group}={f.stem}"])
        OmegaConf.to_container(cfg[group], resolve=True)


def test_experiment_files_hold_only_overrides():
    for f in sorted((CONF / "experiment").glob("*.yaml")):
        assert f.read_text().lstrip().startswith("# @package _global_"), f
        compose_cfg([f"experiment={f.stem}"])


def test_structured_schema_rejects_typos():
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["heads.kk=3"])
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["heads.k=eight"])


def test_key_overrides_used_by_the_docs():
    cfg = compose_cfg(["model=qwen25coder", "data=dl19", "first_stage.depth=10", "data.max_queries=5",
                       "heads=core", "heads.k=4", "tracking.uri=sqlite:////tmp/x.db", "truncation=auto"])
    assert (cfg.model.template, cfg.data.irds_id, cfg.heads.metric, cfg.heads.k) == ("chatml", "msmarco-passage/trec-dl-2019/judged", "core", 4)
    assert "RR(rel=2)" in cfg.data.measures and cfg.truncation.mode == "auto"
    assert compose_cfg(["model=llama"]).model.published_heads.core[0] == "13-18"


def test_hydra_runs_in_place_and_under_root():
    cfg = compose_cfg(return_hydra_config=True)
    assert cfg.hydra.job.chdir is False
    assert cfg.hydra.run.dir.startswith(cfg.paths.root_dir)


@pytest.mark.parametrize("launcher,target", [("slurm", "SlurmLauncher"), ("local_parallel", "JoblibLauncher")])
def test_launcher_configs_compose(launcher, target):
    cfg = compose_cfg([f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)


def test_cpu_grid_sweeps_the_issue_grid():
    cfg = compose_cfg(["experiment=cpu_grid"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params.model == "smollm2,gemma3,qwen25coder" and params["heads.k"] == "4,8,16"
    assert compose_cfg(["experiment=paper_pruning"]).truncation.mode == "fraction"


def _hash(overrides):
    from corexp.tracking import config_hash

    cfg = compose_cfg(overrides)
    cfg.paths.output_dir = "/unused"  # outside a Hydra job; paths are not part of a job's identity anyway
    return config_hash(cfg)


def test_config_hash_ignores_only_fields_the_method_never_reads():
    # ICR has no k, no temperature and nothing to truncate with truncation=auto: one job, not six.
    icr = {_hash(["heads=all", f"heads.k={k}", f"truncation={t}"]) for k in (4, 8, 16) for t in ("none", "auto")}
    assert len(icr) == 1
    assert _hash(["heads=qrhead", "heads.tau=0.5"]) == _hash(["heads=qrhead", "heads.tau=0.1"])
    assert _hash(["truncation=none", "truncation.fraction=0.3"]) == _hash(["truncation=none"])
    # ...and still separates every field that changes what a job computes.
    distinct = [["heads=core", "heads.k=4"], ["heads=core", "heads.k=8"], ["heads=core", "heads.tau=0.5"],
                ["heads=qrhead", "heads.k=8"], ["heads=core", "heads.k=8", "truncation=none"],
                ["heads=all", "truncation=fraction"], ["heads=all", "truncation=fraction", "truncation.fraction=0.3"],
                ["heads=random", "heads.seed=1"], ["heads=random"], ["heads=all", "data.max_queries=5"],
                ["heads=core", "detection.num_queries=50"]]
    hashes = [_hash(o) for o in distinct]
    assert len(set(hashes)) == len(hashes) and icr.isdisjoint(hashes)


def test_data_dir_points_every_dataset_at_its_local_folder(tmp_path, monkeypatch):
    (tmp_path / "scifact").mkdir()
    monkeypatch.setenv("COREXP_DATA_DIR", str(tmp_path))
    assert compose_cfg(["data=scifact"]).data.local_dir == str(tmp_path / "scifact")
    assert compose_cfg(["data=dl19"]).data.local_dir is None  # no such folder: ir_datasets as before
    monkeypatch.delenv("COREXP_DATA_DIR")
    assert compose_cfg(["data=scifact"]).data.local_dir is None
