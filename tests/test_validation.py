"""Every numeric and enum setting: a value either means exactly what it says, or the CLI stops with one line.

The allowed values are written here independently of the declarations (corexp.settings, the README's table): the
test is the specification, the declarations the implementation.
"""

import json
import math
import os
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corexp.errors import CorexpError
from corexp.job import Job
from corexp.validation import check_overrides, rules

from helpers import compose_cfg


def validate(cfg):
    """What every entry point runs: the composed config and its built components, checked once."""
    Job.from_config(cfg)

BASE = ["heads=core", "truncation=fraction", "fusion=linear", "first_stage=dense"]


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v):
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


def int_at_least(lo, nullable=False):
    return lambda v: (v is None and nullable) or (is_int(v) and v >= lo)


def num_in(lo, hi=None, lo_open=False, hi_open=False, nullable=False):
    def ok(v):
        if v is None:
            return nullable
        if not is_num(v):
            return False
        if v < lo or (lo_open and v == lo):
            return False
        return hi is None or v < hi or (v == hi and not hi_open)
    return ok


def one_of(*names):
    return lambda v: isinstance(v, str) and v in names


DEVICES = lambda v: isinstance(v, str) and (v in ("auto", "cpu", "mps", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()))  # noqa: E731

# setting -> (is the value allowed?, what the plan must show for an allowed value: plan -> value)
SPEC = {
    "data.max_queries": (int_at_least(1, nullable=True), lambda p, v: p["queries"] == (50 if v is None else min(v, 50))),
    "first_stage.depth": (int_at_least(1), lambda p, v: p["depth"] == v),
    "first_stage.hits": (int_at_least(1), None),
    "first_stage.k1": (num_in(0), None),
    "first_stage.b": (num_in(0, 1), None),
    "first_stage.rrf_k": (int_at_least(1), None),
    "first_stage.chunk_size": (int_at_least(1), None),
    "first_stage.encoder.batch_size": (int_at_least(1), None),
    "first_stage.encoder.max_seq_length": (int_at_least(1, nullable=True), None),
    "heads.k": (int_at_least(1), lambda p, v: p["heads"]["k"] == v),
    "heads.tau": (num_in(0, lo_open=True, nullable=True), lambda p, v: p["tau"] == (0.1 if v is None else v)),
    "heads.seed": (int_at_least(0), None),
    "truncation.fraction": (num_in(0, 1, hi_open=True), lambda p, v: p["truncation"]["fraction"] == v),
    "truncation.layers": (int_at_least(1), lambda p, v: any(i.startswith("truncation.layers=") for i in p["ignored"])),
    "detection.num_queries": (int_at_least(1), lambda p, v: p["detection"]["queries"] == v),
    "detection.num_negatives": (int_at_least(1), lambda p, v: p["detection"]["negatives"] == v),
    "detection.positions": (lambda v: is_int(v) and 1 <= v <= 20, lambda p, v: p["detection"]["positions"] == v),
    "detection.max_words": (int_at_least(1, nullable=True), None),
    "prompt.max_words": (int_at_least(1, nullable=True), lambda p, v: p["max_words"] == v),
    "prompt.overflow": (one_of("reduce", "error"), None),
    "prompt.span_rule.query_span_end": (one_of("query", "prompt_end", "suffix_first_token"), None),
    "scoring.calibration": (lambda v: isinstance(v, bool), lambda p, v: p["scoring"]["calibration"] == v),
    "fusion.alpha": (num_in(0, 1), lambda p, v: p["fusion"]["alpha"] == v),
    "fusion.rrf_k": (int_at_least(1), lambda p, v: any(i.startswith("fusion.rrf_k=") for i in p["ignored"])),
    "model.dtype": (one_of("auto", "bfloat16", "float32", "float16"),  # resolved at the door: auto is fp32 on a CPU
                    lambda p, v: p["dtype"] == ("float32" if v == "auto" else v)),
    "model.device": (DEVICES, lambda p, v: p["device"] == v),
}
ENUM_WORDS = ["query", "prompt_end", "suffix_first_token", "reduce", "error", "whitespace", "space", "auto", "bfloat16",
              "float32", "float16", "cpu", "cuda", "cuda:1", "mps", "tpu", "sideways", "int8", "abc", ""]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 60),
    st.integers(-10**12, 10**12),
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.floats(min_value=-0.5, max_value=1.5),
    st.sampled_from(ENUM_WORDS),
)


def override(key, v):
    if v is None:
        return f"{key}=null"
    if isinstance(v, bool):
        return f"{key}={str(v).lower()}"
    if isinstance(v, str):
        return f"{key}='{v}'"  # quoted: always a string, whatever it spells
    if isinstance(v, float) and not math.isfinite(v):
        return f"{key}={'nan' if v != v else ('inf' if v > 0 else '-inf')}"
    return f"{key}={v!r}"


def test_every_spec_setting_is_in_the_rules_table():
    assert set(SPEC) <= set(rules())


def test_a_setting_declared_by_several_options_has_one_rule():
    import dataclasses

    from corexp.config import GROUPS, group_settings, options

    for group in GROUPS:
        seen = {}
        for option, decls in group_settings(group).items():
            for key, d in decls.items():
                assert seen.setdefault(key, d.rule) == d.rule, (group, option, key)
        assert all(dataclasses.is_dataclass(c) for c in options(group).values())


def test_the_readme_settings_tables_are_generated_from_the_declarations():
    from pathlib import Path

    from corexp.validation import settings_tables

    root = Path(__file__).resolve().parents[1]
    tables = settings_tables()
    assert tables in (root / "README.md").read_text(), \
        "README's settings tables are stale: python -m corexp.validation --readme"
    # the same in every clone and on every machine: no path of this checkout or of this user's home
    assert str(root) not in tables and str(Path.home()) not in tables


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(SPEC)), VALUES)
def test_rules_agree_with_the_spec(key, value):
    """In process and fast: the command-line check and the composed-config check both follow the spec."""
    allowed = SPEC[key][0](value)
    if key == "detection.positions" and is_int(value) and value > 20:  # bounded by num_negatives + 1 = 20
        assert check_overrides([override(key, value)]) is None
        with pytest.raises(CorexpError, match="detection.positions="):
            validate(compose_cfg([*BASE, override(key, value)]))
        return
    if key == "detection.num_queries" and value is None:  # null: every judged query, for judged instances only
        assert check_overrides([override(key, value)]) is None
        with pytest.raises(CorexpError, match="detection.num_queries=null is not allowed with detection.instances=sampled"):
            validate(compose_cfg([*BASE, override(key, value)]))
        assert validate(compose_cfg([*BASE, "detection=crossval", override(key, value)])) is None
        return
    msg = check_overrides([override(key, value)])
    assert (msg is None) == allowed, (key, value, msg)
    if not allowed:
        assert msg.startswith(f"{key}=") and "is not allowed: use " in msg and "\n" not in msg
    else:
        validate(compose_cfg([*BASE, override(key, value)]))


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    from tiny_models import save_tiny_checkpoint

    tmp = tmp_path_factory.mktemp("cli")
    return tmp, save_tiny_checkpoint(tmp / "tiny")


CASES_RUN = []


# 25 drawn examples (~5 s each, a CLI process apiece): the wiring from the command line; every setting's rule is
# covered in process by test_rules_agree_with_the_spec (400 examples).
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(SPEC)), VALUES)
def test_cli_runs_what_the_value_means_or_stops_with_one_line(cli_env, key, value):
    """The real CLI: an allowed value gives exactly that plan; any other exits non-zero with one line, no traceback,
    and creates no MLflow run (invalid values run without dry_run, so a miss would start a real job)."""
    tmp, tiny = cli_env
    CASES_RUN.append((key, value))
    allowed, check = SPEC[key]
    allowed = allowed(value) and not (key == "detection.positions" and value > 20)
    db = tmp / f"m{len(CASES_RUN)}.db"
    cmd = [sys.executable, "-m", "corexp", *BASE, override(key, value), f"tracking.uri=sqlite:///{db}",
           f"hydra.run.dir={tmp}/out", "progress=false", f"model.path={tiny}", "model.gguf=null", "model.template=plain",
           "model.name=tiny", f"paths.cache_dir={tmp}/cache"]
    if allowed:
        cmd.append("dry_run=true")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if allowed:
        assert proc.returncode == 0, proc.stderr[-2000:]
        plan = json.loads(proc.stdout[proc.stdout.index("{"):])
        if check is not None:
            assert check(plan, value), (key, value, plan)
    else:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert len(lines) == 1 and lines[0].startswith(f"corexp: error: {key}="), proc.stderr[-2000:]
        assert not db.exists()  # stopped before MLflow was even opened


def test_negative_max_queries_fails_fast_with_one_line(tmp_path):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "corexp", "data.max_queries=-5", f"tracking.uri=sqlite:///{tmp_path}/m.db"],
                          capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2 and not (tmp_path / "m.db").exists()
    assert proc.stderr.strip() == ("corexp: error: data.max_queries=-5 is not allowed: "
                                   "use null (all queries) or an integer >= 1")
    assert elapsed < 30  # seconds, not a job: nothing was loaded (typically ~2 s)


def test_sweep_values_are_checked_before_anything_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "corexp", "-m", "heads.k=4,0", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                           f"hydra.sweep.dir={tmp_path}/sweep"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("corexp: error: heads.k=0 is not allowed")
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "sweep").exists()


def test_values_from_config_files_are_checked_in_the_job():
    cfg = compose_cfg(["detection.positions=5", "detection.num_negatives=3"])
    with pytest.raises(CorexpError, match=r"detection.positions=5 is not allowed: use 1..4"):
        validate(cfg)
    with pytest.raises(CorexpError, match="truncation.layers=null is not allowed: use an integer >= 1"):
        validate(compose_cfg(["truncation=layers", "truncation.layers=null"]))


def test_a_strategy_of_the_prompt_is_chosen_like_a_setting():
    """prompt.doc_order=reversed chooses the nested strategy (Hydra's prompt/doc_order=reversed); an unknown one is one
    line with the options."""
    assert check_overrides(["prompt.doc_order=reversed"]) is None
    assert check_overrides(["prompt.doc_order=sideways"]) == ("prompt.doc_order=sideways is not an option; choose one of "
                                                             "retriever, reversed, shuffled")
    assert check_overrides(["prompt.doc_order.seed=-1"]) == "prompt.doc_order.seed=-1 is not allowed: use an integer >= 0"
