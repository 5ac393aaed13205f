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
    assert (cfg.heads._target_, cfg.heads.k, cfg.truncation._target_) == (
        "corexp.components.heads.CoReHeads", 8, "corexp.components.truncation.AutoTruncation")  # the paper's method by default
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


def test_typos_and_wrong_types_are_rejected():
    from corexp.errors import CorexpError
    from corexp.job import Job

    with pytest.raises(ConfigCompositionException):
        compose_cfg(["heads.kk=3"])  # no heads option declares kk
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["model.dtpye=float32"])  # structured schema of a settings group
    with pytest.raises(CorexpError, match="heads.k='eight' is not allowed: use an integer >= 1"):
        Job.from_config(compose_cfg(["heads.k=eight"]))


@pytest.mark.parametrize("group", ["heads", "first_stage", "truncation", "fusion"])
def test_every_option_is_one_class_instantiated_from_its_yaml(group):
    """Each option's YAML holds `_target_` and exactly the class's declared settings; Hydra instantiates it."""
    import dataclasses

    from corexp.components.base import build, options

    assert options(group), group
    for name, cls in options(group).items():
        node = compose_cfg([f"{group}={name}"])[group]
        built = build(node, group)
        assert type(built.component) is cls and built.component.name == name and not built.ignored
        assert set(node) - {"_target_"} == {f.name for f in dataclasses.fields(cls)}, name


def test_a_group_setting_reaches_the_options_that_take_it():
    from corexp.job import Job

    icr = Job.from_config(compose_cfg(["heads=all", "heads.k=8"]))
    assert icr.ignored == ["heads.k=8 is ignored by heads=all (ICR uses every head; heads=core, qrhead or random take a top-k)"]
    assert Job.from_config(compose_cfg(["heads=qrhead", "heads.tau=0.5"])).ignored == ["heads.tau=0.5 is ignored by heads=qrhead"]
    core = Job.from_config(compose_cfg(["heads.k=4"]))
    assert core.ignored == [] and core.heads.k == 4


def test_key_overrides_used_by_the_docs():
    cfg = compose_cfg(["model=qwen25coder", "data=dl19", "first_stage.depth=10", "data.max_queries=5",
                       "heads=core", "heads.k=4", "tracking.uri=sqlite:////tmp/x.db", "truncation=auto"])
    assert (cfg.model.template, cfg.data.irds_id, cfg.heads.k) == ("chatml", "msmarco-passage/trec-dl-2019/judged", 4)
    assert "RR(rel=2)" in cfg.data.measures and cfg.truncation._target_.endswith("AutoTruncation")
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
    assert compose_cfg(["experiment=paper_pruning"]).truncation._target_.endswith("FractionTruncation")


def _hash(overrides):
    from corexp.job import Job
    from corexp.tracking.store import config_hash

    cfg = compose_cfg(overrides)
    cfg.paths.output_dir = "/unused"  # outside a Hydra job; paths are not part of a job's identity anyway
    return config_hash(Job.from_config(cfg))


def test_config_hash_ignores_only_fields_the_method_never_reads():
    # ICR has no k, no temperature and nothing to truncate with truncation=auto: one job, not six.
    icr = {_hash(["heads=all", f"heads.k={k}", f"truncation={t}"]) for k in (4, 8, 16) for t in ("none", "auto")}
    assert len(icr) == 1
    assert _hash(["heads=qrhead", "heads.tau=0.5"]) == _hash(["heads=qrhead", "heads.tau=0.1"])
    assert _hash(["truncation=none", "truncation.fraction=0.3"]) == _hash(["truncation=none"])
    assert _hash(["model.dtype=auto"]) == _hash(["model.dtype=float32"])  # auto is float32 on a CPU
    assert _hash(["readout_cache=true"]) == _hash([])  # how scores are computed, not what
    # ...and still separates every field that changes what a job computes.
    distinct = [["heads=core", "heads.k=4"], ["heads=core", "heads.k=8"], ["heads=core", "heads.tau=0.5"],
                ["heads=qrhead", "heads.k=8"], ["heads=core", "heads.k=8", "truncation=none"],
                ["heads=all", "truncation=fraction"], ["heads=all", "truncation=fraction", "truncation.fraction=0.3"],
                ["heads=random", "heads.seed=1"], ["heads=random"], ["heads=all", "data.max_queries=5"],
                ["heads=core", "detection.num_queries=50"], ["heads=core", "model.dtype=bfloat16"]]
    hashes = [_hash(o) for o in distinct]
    assert len(set(hashes)) == len(hashes) and icr.isdisjoint(hashes)


def test_data_dir_points_every_dataset_at_its_local_folder(tmp_path, monkeypatch):
    (tmp_path / "scifact").mkdir()
    monkeypatch.setenv("COREXP_DATA_DIR", str(tmp_path))
    assert compose_cfg(["data=scifact"]).data.local_dir == str(tmp_path / "scifact")
    assert compose_cfg(["data=dl19"]).data.local_dir is None  # no such folder: ir_datasets as before
    monkeypatch.delenv("COREXP_DATA_DIR")
    assert compose_cfg(["data=scifact"]).data.local_dir is None


def test_modules_import_without_cycles():
    """The layering the README states: no chain of corexp imports (top-level or inside functions) returns to its start."""
    import ast

    package = Path(__file__).resolve().parents[1] / "src" / "corexp"
    graph = {}
    for f in package.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("corexp"):
                parts = node.module.split(".")
                deps |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        graph[f.stem] = deps - {f.stem}
    state, cycles = {}, []

    def visit(module, stack):
        state[module] = "open"
        for dep in graph.get(module, ()):
            if state.get(dep) == "open":
                cycles.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert cycles == []
