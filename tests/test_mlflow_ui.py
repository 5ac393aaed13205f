"""The MLflow UI as a user sees it, in a real browser: a real 2-job sweep, `mlflow ui` on loopback, headless Chromium.

Needs Debian's chromium (.ci/run installs it) and Playwright for Python, driving the system browser (no download).
Screenshots go to $COREXP_SCREENSHOT_DIR (default: the test's tmp folder); the README's come from
`COREXP_SCREENSHOT_DIR=docs/img python -m pytest tests/test_mlflow_ui.py`.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from helpers import mlflow_server
from tiny_models import save_tiny_checkpoint

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    tiny = save_tiny_checkpoint(tmp / "tiny")
    cmd = [sys.executable, "-m", "corexp", "-m", f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"hydra.sweep.dir={tmp}/sweep",
           f"tracking.artifact_location={tmp}/artifacts", "progress=false", f"model.path={tiny}", "model.gguf=null",
           "model.template=plain", "model.name=tiny", "prompt.max_words=20", "data.max_queries=3", "first_stage.depth=4",
           "heads=core", "heads.k=2,4", "detection.num_queries=4", "detection.num_negatives=3",
           f"paths.cache_dir={tmp}/cache", "tracking.experiment=ui-demo"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["ui-demo"], output_format="list")
    return tmp, runs


@pytest.fixture(scope="module")
def ui(sweep_store):
    tmp, _ = sweep_store
    with mlflow_server(f"sqlite:///{tmp}/mlflow.db", "--workers", "1", command="ui") as base:
        yield base


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        pg = browser.new_page(viewport={"width": 1920, "height": 1000})
        yield pg
        browser.close()


def hide_assistant(page) -> None:
    """Close MLflow 3's assistant side panel so screenshots show the runs (best effort: cosmetic only)."""
    close = page.locator("button[aria-label='Close'], button[aria-label='close']")
    for i in range(close.count()):
        if close.nth(i).is_visible():
            close.nth(i).click()
            break


def shots() -> Path:
    folder = Path(os.environ.get("COREXP_SCREENSHOT_DIR") or Path(os.environ.get("TMPDIR", "/tmp")) / "corexp-shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_sweep_runs_have_distinct_descriptive_names(sweep_store):
    _, runs = sweep_store
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep") != "parent"]
    assert len(parents) == 1 and len(children) == 2
    names = sorted(r.info.run_name for r in children)
    det = "detected on scifact-train-sample (num_queries=4, num_negatives=3)"
    assert names == [f"tiny · CoRe-k{k} τ=0.1 · trunc=auto · {det} · scifact-sample" for k in (2, 4)]
    client = mlflow.MlflowClient()
    for r in children:
        inputs = client.get_run(r.info.run_id).inputs.dataset_inputs
        assert [(i.dataset.name, len(i.dataset.digest)) for i in inputs] == [("scifact-sample", 12)]


def test_runs_page_lists_the_parent_with_its_children(ui, page, sweep_store):
    _, runs = sweep_store
    exp = mlflow.get_experiment_by_name("ui-demo")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    page.goto(f"{ui}/#/experiments/{exp.experiment_id}/runs?viewStateShareKey=corexp")
    parent = next(r for r in runs if r.data.tags.get("sweep") == "parent")
    page.get_by_text(parent.info.run_name).first.wait_for(timeout=60000)
    assert page.get_by_text("No data").count() == 0  # not the GenAI traces overview
    expander = page.locator("[data-testid='runs-table'] button[aria-label*='xpand'], .ag-group-contracted").first
    if expander.count():
        expander.click()
    for child in (r for r in runs if r.data.tags.get("sweep") != "parent"):
        page.get_by_text(child.info.run_name).first.wait_for(timeout=30000)
    page.get_by_text("scifact-sample").first.wait_for(timeout=30000)  # the Dataset column
    hide_assistant(page)
    page.screenshot(path=str(shots() / "mlflow_runs.png"))


def test_compare_view_shows_both_runs_ndcg(ui, page, sweep_store):
    _, runs = sweep_store
    exp = mlflow.get_experiment_by_name("ui-demo")
    children = [r for r in runs if r.data.tags.get("sweep") != "parent"]
    ids = ",".join(f'"{r.info.run_id}"' for r in children)
    page.goto(f"{ui}/#/compare-runs?runs=[{ids}]&experiments=[\"{exp.experiment_id}\"]")
    page.get_by_text(children[0].info.run_name).first.wait_for(timeout=60000)
    page.locator('a[title="Plot chart"]').first.wait_for(timeout=60000)  # the metrics table
    # The table is virtualised (react-virtualized): scroll its grids so the rerank.* rows render, then read the
    # values in the row of rerank.nDCG_at_10 (the name grid and the value grid place a row at the same offset).
    link = page.locator('a[title="Plot chart"]', has_text="rerank.nDCG_at_10").first
    for _ in range(60):
        page.evaluate("() => document.querySelectorAll('.ReactVirtualized__Grid').forEach(g => g.scrollTop = g.scrollHeight)")
        page.wait_for_timeout(500)
        if link.count():
            break
    link.wait_for(timeout=10000)
    page.wait_for_timeout(500)
    values = page.evaluate("""(name) => {
      const link = [...document.querySelectorAll('a[title="Plot chart"]')].find(a => a.textContent.trim() === name);
      const row = link.closest('.ReactVirtualized__Grid__innerScrollContainer > div');
      return [...document.querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > div')]
        .filter(r => r.parentElement !== row.parentElement && r.style.top === row.style.top)
        .map(r => r.innerText.trim());
    }""", "rerank.nDCG_at_10")
    link.scroll_into_view_if_needed()
    hide_assistant(page)
    page.screenshot(path=str(shots() / "mlflow_compare.png"))
    shown = sorted(float(v) for v in values)
    expected = sorted(r.data.metrics["rerank.nDCG_at_10"] for r in children)
    assert shown == pytest.approx(expected, abs=5e-4), (values, expected)
