"""The config is read once, at the door: every group (and every nested strategy) is a class built from its YAML's
`_target_`; defaults live in those classes; imports go only downward through the layers."""

import ast
import dataclasses
import re
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from corexp.config import GROUP_CLASSES, GROUPS, NESTED, config_dir, options
from corexp.errors import CorexpError
from corexp.job import Job

from helpers import build_job, compose_cfg

CONF = config_dir()
PACKAGE = Path(__file__).resolve().parents[1] / "src" / "corexp"


def test_default_composes_to_the_offline_job():
    from corexp.components.heads import CoReHeads
    from corexp.components.truncation import AutoTruncation
    from corexp.engine.prompt import OffsetSpans, RetrieverOrder

    job = build_job()
    assert job.model.name == "smollm2" and job.first_stage.depth == 20
    assert isinstance(job.heads, CoReHeads) and job.heads.k == 8 and isinstance(job.truncation, AutoTruncation)
    assert Path(job.data.local_dir).joinpath("qrels", "test.tsv").is_file()
    assert job.tracking.uri.startswith("sqlite:///") and Path(job.paths.root_dir).is_absolute()
    assert job.prompt.span_rule == OffsetSpans("query") and job.prompt.doc_order == RetrieverOrder()
    assert (job.detection.num_queries, job.detection.max_words, job.scoring.calibration) == (40, 60, True)


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("[!_]*.yaml"))


@pytest.mark.parametrize("group", [*GROUPS, *[g for g in GROUP_CLASSES if g != "first_stage/encoder"], *NESTED])
def test_every_option_of_every_group_is_built(group):
    """Each option composes and is instantiated (nested `_target_`s included) into its class, checked by its rules."""
    for name in _options(group):
        if "/" in group:  # a nested strategy: chosen inside a parent that has the group
            parent = {"first_stage/encoder": ["first_stage=dense"]}.get(group, [])
            job = build_job([*parent, f"{group}={name}"])
            component = getattr(getattr(job, group.split("/")[0]), group.split("/")[1])
        else:
            job = build_job([f"{group}={name}"])
            component = job.components().get(group) if group != "truncation" else job.truncation
        expected = options(group).get(name) or GROUP_CLASSES.get(group)
        assert isinstance(component, expected), (group, name, type(component))


def test_option_files_hold_only_declared_settings_and_no_restated_default():
    """Defaults live in one place (the class): an option's YAML names its class and only what differs from it."""
    for folder in sorted(p for p in CONF.rglob("*") if p.is_dir() and not p.name.startswith(("hydra", "experiment"))):
        group = folder.relative_to(CONF).as_posix()
        for path in sorted(folder.glob("*.yaml")):
            own = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            own.pop("defaults", None)
            target = own.pop("_target_", None)
            if target is None:
                continue
            import hydra.utils

            cls = hydra.utils.get_class(target)
            fields = {f.name: f for f in dataclasses.fields(cls)}
            for key, value in own.items():
                assert key in fields, (path, key)
                f = fields[key]
                default = f.default if f.default is not dataclasses.MISSING else (
                    f.default_factory() if f.default_factory is not dataclasses.MISSING else object())
                assert value != default or (isinstance(value, str) and "${" in value), (f"{group}/{path.name}", key, value)


def test_experiment_files_hold_only_overrides():
    for f in sorted((CONF / "experiment").glob("*.yaml")):
        assert f.read_text().lstrip().startswith("# @package _global_"), f
        Job.from_config(compose_cfg([f"experiment={f.stem}"]))
    pruning = build_job(["experiment=paper_pruning"])
    assert pruning.first_stage.depth == 40 and pruning.truncation.name == "fraction" and pruning.prompt.max_words == 300


def test_typos_and_wrong_types_are_rejected():
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["heads.kk=3"])  # no heads option declares kk (the CLI rejects it before Hydra: test_validation)
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["model.dtpye=float32"])
    with pytest.raises(CorexpError, match="heads.k='eight' is not allowed: use an integer >= 1"):
        build_job(["heads.k=eight"])
    with pytest.raises(CorexpError, match="prompt.doc_order.seed=-1 is not allowed"):
        build_job(["prompt=shuffled", "prompt.doc_order.seed=-1"])


def test_a_group_setting_reaches_the_options_that_take_it():
    icr = build_job(["heads=all", "heads.k=8"])
    assert icr.ignored == ("heads.k=8 is ignored by heads=all (ICR uses every head; heads=core, qrhead or random take a top-k)",)
    assert build_job(["heads=qrhead", "heads.tau=0.5"]).ignored == ("heads.tau=0.5 is ignored by heads=qrhead",)
    core = build_job(["heads.k=4"])
    assert core.ignored == () and core.heads.k == 4


def test_key_overrides_used_by_the_docs():
    from corexp.engine.prompt import ReversedOrder

    job = build_job(["model=qwen25coder", "data=dl19", "first_stage.depth=10", "data.max_queries=5", "heads=core", "heads.k=4",
                     "tracking.uri=sqlite:////tmp/x.db", "truncation=auto", "prompt.doc_order=reversed",
                     "heads=layers", "heads.start=2", "heads.end=6"])
    assert (job.model.template, job.data.irds_id, job.first_stage.depth, job.data.max_queries) == (
        "chatml", "msmarco-passage/trec-dl-2019/judged", 10, 5)
    assert "RR(rel=2)" in job.data.measures and job.prompt.doc_order == ReversedOrder()
    assert (job.heads.start, job.heads.end) == (2, 6)
    assert build_job(["model=llama"]).model.published_heads["core"][0] == "13-18"


def test_hydra_runs_in_place_and_folders_are_unique_per_process():
    import os

    cfg = compose_cfg(return_hydra_config=True)
    assert cfg.hydra.job.chdir is False
    assert cfg.hydra.run.dir.startswith(cfg.paths.root_dir) and cfg.hydra.run.dir.endswith(f"-{os.getpid()}")
    assert cfg.hydra.sweep.dir.endswith(f"-{os.getpid()}")


@pytest.mark.parametrize("launcher,target", [("slurm", "SlurmLauncher"), ("local_parallel", "JoblibLauncher")])
def test_launcher_configs_compose(launcher, target):
    cfg = compose_cfg([f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)


def test_cpu_grid_sweeps_the_issue_grid():
    cfg = compose_cfg(["experiment=cpu_grid"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params.model == "smollm2,gemma3,qwen25coder" and params["++heads.k"] == "4,8,16"


def _hash(overrides):
    return build_job(overrides).identity().config_hash


def test_config_hash_ignores_only_fields_the_method_never_reads():
    # ICR has no k, no temperature and nothing to truncate with truncation=auto: one job, not six.
    icr = {_hash(["heads=all", f"heads.k={k}", f"truncation={t}"]) for k in (4, 8, 16) for t in ("none", "auto")}
    assert len(icr) == 1
    assert _hash(["heads=qrhead", "heads.tau=0.5"]) == _hash(["heads=qrhead", "heads.tau=0.1"])
    assert _hash(["truncation=none", "truncation.fraction=0.3"]) == _hash(["truncation=none"])
    assert _hash(["model.dtype=auto"]) == _hash(["model.dtype=float32"])  # auto is float32 on a CPU
    assert _hash(["readout_cache=true"]) == _hash([])  # how scores are computed, not what
    assert _hash(["tracking.experiment=other"]) == _hash([])
    # ...and still separates every field that changes what a job computes.
    distinct = [["heads=core", "heads.k=4"], ["heads=core", "heads.k=8"], ["heads=core", "heads.tau=0.5"],
                ["heads=qrhead", "heads.k=8"], ["heads=core", "heads.k=8", "truncation=none"],
                ["heads=all", "truncation=fraction"], ["heads=all", "truncation=fraction", "truncation.fraction=0.3"],
                ["heads=random", "heads.seed=1"], ["heads=random"], ["heads=all", "data.max_queries=5"],
                ["heads=core", "detection.num_queries=50"], ["heads=core", "model.dtype=bfloat16"],
                ["heads=all", "scoring.calibration=false"], ["heads=all", "prompt.doc_order=reversed"],
                ["heads=layers", "heads.start=3"], ["heads=window", "heads.width=2"]]
    hashes = [_hash(o) for o in distinct]
    assert len(set(hashes)) == len(hashes) and icr.isdisjoint(hashes)


def test_identity_is_the_data_content_not_its_path(tmp_path):
    """A copy of the data folder elsewhere (another clone, a cluster node) has the same identity; one changed judgment
    gives another, with the same settings hash (how a job tells 'the data changed')."""
    import shutil

    from corexp.locations import RESOURCES_DIR

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(RESOURCES_DIR / "scifact_sample", a)
    shutil.copytree(RESOURCES_DIR / "scifact_sample", b)
    ia, ib = (build_job(["heads=all", f"data.local_dir={d}"]).identity() for d in (a, b))
    assert ia == ib
    with open(b / "qrels" / "test.tsv", "a") as fh:
        fh.write("1\t4983\t1\n")
    ic = build_job(["heads=all", f"data.local_dir={b}"]).identity()
    assert ic.config_hash != ia.config_hash and ic.setup_hash == ia.setup_hash and ic.data_fingerprint != ia.data_fingerprint


def test_data_dir_points_every_dataset_at_its_local_folder(tmp_path, monkeypatch):
    (tmp_path / "scifact").mkdir()
    monkeypatch.setenv("COREXP_DATA_DIR", str(tmp_path))
    assert compose_cfg(["data=scifact"]).data.local_dir == str(tmp_path / "scifact")
    assert compose_cfg(["data=dl19"]).data.local_dir is None  # no such folder: ir_datasets as before
    monkeypatch.delenv("COREXP_DATA_DIR")
    assert compose_cfg(["data=scifact"]).data.local_dir is None


# -- the layers -------------------------------------------------------------------------------------------------------
LAYERS = [  # lowest first; a module may import its own layer and the layers below, never above
    ("foundation", ("errors", "settings", "locations", "files")),
    ("data", ("data",)),
    ("engine", ("engine",)),
    ("components", ("components",)),
    ("tracking", ("tracking",)),
    ("door", ("config", "job", "callbacks", "validation")),
    ("pipeline", ("pipeline",)),
    ("interfaces", ("api", "__main__", "pyterrier", "verify_cache", "migrate", "__init__")),
    ("reporting", ("report", "studies")),
]


def _imports():
    """module path (e.g. engine.prompt) -> corexp modules it imports, at the top or inside functions."""
    graph = {}
    for f in PACKAGE.rglob("*.py"):
        name = ".".join(f.relative_to(PACKAGE).with_suffix("").parts)
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("corexp"):
                mod = node.module.split(".", 1)[1] if "." in node.module else ""
                deps |= {mod or a.name for a in node.names}  # `from corexp import x`: the module x
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("corexp.")}
        graph[name] = {d for d in deps if d} - {name}
    return graph


def _layer(module):
    top = module.split(".")[0]
    return next(i for i, (_, tops) in enumerate(LAYERS) if top in tops)


def test_the_folders_are_the_layers_and_imports_only_go_down():
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__" and p.name != "resources"} == {
        "data", "engine", "components", "pipeline", "tracking", "report", "studies"}
    upward = [f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})"
              for m, deps in _imports().items() for d in deps if _layer(d) > _layer(m) and m != "__init__"]
    assert upward == []


def test_modules_import_without_cycles():
    imports = _imports()  # parsed once: every module's syntax tree
    graph = {m: {d.rsplit(".", 1)[0] if d not in imports else d for d in deps} for m, deps in imports.items()}
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


def test_below_the_door_nothing_reads_the_config():
    """Outside __main__, config, settings, validation and job (and the Hydra callback, corexp.callbacks), no module touches a DictConfig
    or has a parameter typed cfg/job/res: Any."""
    door = {"__main__", "config", "settings", "validation", "job", "callbacks"}
    offenders = []
    for f in PACKAGE.rglob("*.py"):
        name = ".".join(f.relative_to(PACKAGE).with_suffix("").parts)
        text = f.read_text()
        if name in door:
            continue
        if "DictConfig" in text or "OmegaConf" in text:
            offenders.append(f"{name}: DictConfig/OmegaConf")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for arg in node.args.args:
                    if arg.arg in ("cfg", "job", "res") and ast.unparse(arg.annotation or ast.Constant("")) == "Any":
                        offenders.append(f"{name}.{node.name}({arg.arg}: Any)")
    assert offenders == []


def test_a_run_name_shows_only_what_its_job_computes_with():
    """In a sweep over heads=all,core,random heads.seed=0,1 the ICR and CoRe runs take no seed: their names do not show
    one; the random draws' names do."""
    from dataclasses import replace

    from corexp.job import RunContext

    def name(*overrides):
        job = build_job(overrides)
        swept = ("heads", "heads.seed")
        return replace(job, context=RunContext(tuple(overrides), swept)).run_name()

    assert name("heads=all", "heads.seed=0") == "smollm2 · ICR · scifact-sample"
    assert name("heads=core", "heads.seed=0") == "smollm2 · CoRe-k8 τ=0.1 · trunc=auto · scifact-sample"
    assert name("heads=random", "heads.seed=1") == "smollm2 · random-k8 · trunc=auto · scifact-sample · heads.seed=1"


def test_names_and_labels_show_where_detected_heads_come_from():
    """Detection data, fold and size change the numbers: a detected head set's name and report label say them (the
    default quick set alone is left unnamed); a swept detection setting is not repeated; ICR detects nothing."""
    from dataclasses import replace

    from corexp.job import RunContext
    from corexp.tracking import names

    def named(*overrides, swept=()):
        job = replace(build_job(overrides), context=RunContext(tuple(overrides), swept))
        return job.run_name(), names.method_label(job.run_key())

    assert named("heads=core") == ("smollm2 · CoRe-k8 τ=0.1 · trunc=auto · scifact-sample", "CoRe-k8 τ=0.1 [trunc=auto]")
    assert named("heads=core", "detection=scifact_train", "detection.fold=1", swept=("detection.fold",)) == (
        "smollm2 · CoRe-k8 τ=0.1 · trunc=auto · detected on scifact-train (fold=1) · scifact-sample",
        "CoRe-k8 τ=0.1 [trunc=auto, detected on scifact-train (fold=1)]")
    assert named("heads=qrhead", "detection.num_queries=100")[0] == \
        "smollm2 · QRHead-k16 · trunc=auto · detected on scifact-train-sample (num_queries=100) · scifact-sample"
    assert named("heads=core", "detection=crossval", "detection.folds=3", swept=("detection.folds",))[0] == \
        "smollm2 · CoRe-k8 τ=0.1 · trunc=auto · 3-fold CV · scifact-sample"
    assert named("heads=all", "detection=scifact_train")[0] == "smollm2 · ICR · scifact-sample"


# -- keys: one per component, ir_measures style ------------------------------------------------------------------------
def _components(component, prefix):
    """The component and every nested component, with their dotted places."""
    from corexp.settings import Component

    yield prefix, component
    for name in component.settings():
        value = getattr(component, name)
        if isinstance(value, Component):
            yield from _components(value, f"{prefix}.{name}")


@pytest.mark.parametrize("group", [*GROUPS, *[g for g in GROUP_CLASSES if g != "first_stage/encoder"], *NESTED])
def test_every_options_key_parses_back_into_the_component(group):
    """`parse_key(c.key()) == c` for every option of every group, nested strategies included; defaults and where data
    is read from (local_dir, irds_id, run_file) are left out."""
    from corexp.settings import parse_key

    parent = {"first_stage/encoder": ["first_stage=dense"]}
    for name in _options(group):
        job = build_job([*parent.get(group, []), f"{group}={name}"])
        for where, component in _components(job.components()[group.split("/")[0]], group):
            key = component.key()
            assert parse_key(key) == component.unlocated(), (where, key)
            assert "local_dir" not in key and "irds_id" not in key, key


def test_identity_params_name_and_label_derive_from_the_keys_alone():
    """A run's logged params parse back into its run key; the key alone gives the same identity, name and report label
    as the job; the door resolves the model's τ (heads.tau=null is the model's), its precision and the effective
    truncation, so the key says what is computed."""
    from corexp.tracking import names
    from corexp.tracking.identity import RunKey

    for overrides in (["heads=core"], ["heads=core", "fusion=rrf", "detection=scifact_train", "detection.fold=2"],
                      ["heads=random", "heads.seed=3", "prompt.doc_order=reversed"], ["heads=all", "truncation=auto"],
                      ["heads=window", "scoring.calibration=false", "model.dtype=bfloat16"]):
        job = build_job(overrides)
        key = RunKey.from_params(job.run_key().params())
        assert key == job.run_key()
        assert key.identity({"data": "x"}, "c") == job.run_key().identity({"data": "x"}, "c")
        assert names.run_name(key) == job.run_name() and names.tags(key)["method_label"] == names.method_label(key)
    assert build_job(["heads=core", "heads.tau=null"]).run_key() == build_job(["heads=core", "heads.tau=0.1"]).run_key()
    assert build_job(["heads=core"]).heads.key() == "CoRe(tau=0.1)"  # the model's τ, resolved
    assert build_job(["heads=all", "truncation=auto"]).truncation.key() == "NoTruncation()"
    assert "dtype='float32'" in build_job(["model.dtype=auto"]).model.key()
    # keys logged on 2026-12-05 (before the door resolved the precision) carry dtype=auto; the logged resolved one wins
    job = build_job(["heads=core"])
    params = {**job.run_key().params(), "key.model": job.model.key().replace(",dtype='float32'", ""),
              "model.dtype_resolved": "float32"}
    assert "dtype" not in params["key.model"] and RunKey.from_params(params) == job.run_key()
    assert names.method_label(RunKey.from_params(params)) == "CoRe-k8 τ=0.1 [trunc=auto]"
    dense = build_job(["heads=core", "first_stage=dense"]).run_key()  # a report row per first stage
    assert names.method_label(dense) == "CoRe-k8 τ=0.1 [dense:minilm, trunc=auto]"


def test_a_key_names_only_what_differs_from_the_defaults_and_refuses_what_it_cannot_be():
    from corexp.settings import parse_key

    job = build_job(["heads=core", "heads.k=4", "heads.tau=0.05", "prompt.doc_order=shuffled", "prompt.doc_order.seed=3"])
    assert job.heads.key() == "CoRe(k=4,tau=0.05)"
    assert build_job(["heads=window", "heads.width=3"]).heads.key() == "Window(width=3)"
    assert build_job(["heads=all"]).heads.key() == "ICR()"
    assert build_job(["heads=qrhead", "heads.variant=lme"]).heads.key() == "QRHead(variant='lme')"
    assert "doc_order=ShuffledOrder(seed=3)" in job.prompt.key()
    assert parse_key(job.prompt.key()) == job.prompt
    for bad, why in (("CoRe(k=4", "is not a component key"), ("Nothing(k=1)", "no component is keyed 'Nothing'"),
                     ("CoRe(width=3)", "CoRe has no setting 'width'")):
        with pytest.raises(ValueError, match=re.escape(why)):
            parse_key(bad)


def test_reports_read_runs_through_keys_and_the_tracker_alone():
    """The report and the studies import neither the job nor the config (they read runs, and each run's keys, through
    corexp.tracking); no module outside tracking/ touches the MLflow client; the job is its components and the door
    (<= 80 lines) and the re-ranker a small class over forward strategies (<= 120 lines)."""
    imports = _imports()
    reporting = {m: sorted(d for d in deps if d.split(".")[0] in ("job", "config"))
                 for m, deps in imports.items() if m.split(".")[0] in ("report", "studies")}
    assert {m: d for m, d in reporting.items() if d} == {}
    client = [str(f.relative_to(PACKAGE)) for f in PACKAGE.rglob("*.py")
              if f.parent.name != "tracking" and re.search(r"\.client\b", f.read_text())]
    assert client == []
    assert len((PACKAGE / "job.py").read_text().splitlines()) <= 80
    source = (PACKAGE / "engine" / "reranker.py").read_text()
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "AttentionReranker")
    assert cls.end_lineno - cls.lineno + 1 <= 120
