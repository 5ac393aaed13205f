"""The Tracker owns MLflow: the store and experiment, run names, the identity claim, heartbeat, logging, and the public
readers the report and the studies use. Nothing else in corexp imports mlflow for runs.

A run's identity (corexp.tracking.identity) is what it computes — the job's settings with the data as its content
fingerprint — and the code that computed it. `claim` skips an identity that already FINISHED with this code, says in
one line why it reruns one (other code, changed data), fails RUNNING runs whose process is provably gone
(corexp.tracking.liveness), and makes two processes given one identity agree on the earliest: the other waits for it,
at most `tracking.wait_limit_s`, and then skips.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from corexp.errors import CorexpError, one_line, storage_problem
from corexp.settings import Component, setting
from corexp.tracking.identity import Identity
from corexp.tracking.liveness import HEARTBEAT_S, ProcessId, is_alive

log = logging.getLogger(__name__)

# MLflow 3 opens an experiment on the GenAI traces overview unless its kind says it holds model-development runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# The columns a re-ranking study compares, as a shared view of the runs table (open it with ?viewStateShareKey=corexp).
VIEW_KEY = "corexp"
VIEW_COLUMNS = ["attributes.`Dataset`", "metrics.`rerank.nDCG_at_10`", "metrics.`first_stage.nDCG_at_10`", "metrics.`latency_mean_s`",
                "metrics.`kept_layers`", "tags.`method`", "params.`heads.name`", "params.`data.name`"]


@dataclass(frozen=True)
class TrackingSpec(Component):
    """The `tracking` group: where runs are logged and how other processes' runs are judged."""

    key_name: ClassVar[str] = "Tracking"

    name: ClassVar[str] = "mlflow"
    uri: str = setting(doc="MLflow tracking URI (sqlite:///<file>, a folder, or http(s)://<server>)")
    artifact_location: str | None = setting(None, null="MLflow's default", doc="artifact root of new experiments")
    experiment: str = setting("corexp", doc="MLflow experiment")
    run_name: str | None = setting(None, null="named for what it computes", doc="run name")
    stale_after_s: float = setting(600.0, gt=0, doc="a RUNNING run whose process cannot be checked (another machine or pid "
                                                    "namespace) is failed after this long without a heartbeat")
    wait_limit_s: float = setting(21600.0, gt=0, doc="the longest a job waits for another process's run of the same "
                                                     "identity before it gives up (6 h: the longest job of the shipped "
                                                     "models on a CPU is about 2 h)")

    def open(self) -> Tracker:
        """The tracker of this store and experiment, created where they do not exist yet."""
        return Tracker.open(self)


def experiment_tags() -> dict[str, str]:
    view = {"selectedColumns": VIEW_COLUMNS, "orderByKey": VIEW_COLUMNS[1], "orderByAsc": False}
    return {EXPERIMENT_KIND_TAG: "custom_model_development", f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps(view)}


def store_full(err: BaseException, uri: str) -> None:
    """Raise the one line for a store the OS or SQLite will not write (full disk, read-only, no permission)."""
    problem = storage_problem(err)
    if problem is not None and not uri.startswith(("http://", "https://")):
        db = _sqlite_path(uri)
        raise CorexpError(f"the MLflow store {db or uri} cannot be written: {problem[0]}; free space on its disk or make "
                          "it writable, or set tracking.uri to a store elsewhere") from None


def check_server(uri: str, attempts: int = 3, timeout_s: float = 10.0) -> None:
    """The server answers /health. A refused connection fails at once; a server too busy to answer within timeout_s
    (its workers and the jobs sharing a loaded machine) gets `attempts` tries before the job gives up."""
    import urllib.error
    import urllib.request

    for attempt in range(attempts):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
            return
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            refused = isinstance(reason, ConnectionRefusedError) or "refused" in str(reason).lower()
            if refused or attempt == attempts - 1:
                raise CorexpError(f"MLflow tracking URI '{uri}' is unreachable ({reason}); fix tracking.uri") from None
            time.sleep(1.0)


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def open_command(uri: str, experiment_id: str, run_id: str) -> str:
    """How to look at a run in the MLflow UI."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri} --port 5000   # then http://127.0.0.1:5000/{page}"


@dataclass(frozen=True)
class StoredRun:
    """A run as the store holds it (plain data: what the report and the claim read)."""

    run_id: str
    name: str
    experiment_id: str
    status: str
    start_ms: int
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]

    @classmethod
    def of(cls, run: Any) -> StoredRun:
        return cls(run.info.run_id, run.info.run_name, run.info.experiment_id, run.info.status, int(run.info.start_time),
                   dict(run.data.tags), dict(run.data.params), dict(run.data.metrics))

    @property
    def code_digest(self) -> str:
        return self.tags.get("code_digest", "")


@dataclass(frozen=True)
class RunRequest:
    """What a job asks the tracker for: its identity, name, tags, params, config text and sweep parent."""

    identity: Identity
    name: str
    tags: dict[str, str]
    params: dict[str, str]
    config_text: str
    parent_id: str | None = None
    pinned_name: bool = False  # tracking.run_name: used as given


@dataclass
class Claim:
    """The outcome of `Tracker.claim`: an identity that FINISHED already (`finished`), or this process's run."""

    finished: StoredRun | None = None
    run: ActiveRun | None = None


def all_runs(client: Any, experiment_ids: list[str], filter_string: str = "") -> list[StoredRun]:
    """Every run of the experiments matching the filter, page by page (the one paging loop)."""
    out, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        out += [StoredRun.of(r) for r in page]
        token = page.token
        if not token:
            return out


class Tracker:
    def __init__(self, spec: TrackingSpec, mlflow: Any, experiment_id: str):
        self.spec = spec
        self.mlflow = mlflow
        self.client = mlflow.MlflowClient()
        self.experiment_id = experiment_id
        self.here = ProcessId.current()

    # -- opening ----------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, spec: TrackingSpec) -> Tracker:
        """Point MLflow at the store and experiment, creating them when needed; a clear error if the store is
        unreachable or its folder cannot be created."""
        import mlflow

        uri = spec.uri
        if uri.startswith(("http://", "https://")):  # fail fast instead of MLflow's minutes of retries
            check_server(uri)
        lock: Any = contextlib.nullcontext()
        db = _sqlite_path(uri)
        if db is not None:  # jobs starting at once on a new store would create its tables concurrently
            from corexp.files import file_lock

            try:
                db.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise CorexpError(f"tracking.uri={uri}: cannot create the store's folder {db.parent} "
                                  f"({err.strerror or err}); choose a writable path (sqlite:////absolute/path/mlflow.db)") from None
            lock = file_lock(db.parent / f".{db.name}.init.lock")
        with lock:
            mlflow.set_tracking_uri(uri)
            try:
                exp = mlflow.get_experiment_by_name(spec.experiment)
                if exp is None:
                    art = spec.artifact_location
                    art = art if not art or "://" in str(art) else Path(art).as_uri()
                    try:
                        mlflow.create_experiment(spec.experiment, artifact_location=art, tags=experiment_tags())
                    except Exception:
                        if mlflow.get_experiment_by_name(spec.experiment) is None:
                            raise
                elif exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # experiments made by older versions
                    for key, value in experiment_tags().items():
                        mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, key, value)
                exp = mlflow.set_experiment(spec.experiment)
            except Exception as err:
                text = str(err)
                store_full(err, uri)
                if any(code in text for code in ("401", "403", "Unauthorized", "Forbidden", "Permission denied")):
                    who = os.environ.get("MLFLOW_TRACKING_USERNAME")
                    raise CorexpError(f"MLflow tracking server {uri} refused "
                                      f"{'the credentials of user ' + repr(who) if who else 'a job without credentials'} "
                                      "(an authenticated server): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                                      "to an account with access to the experiment") from None
                raise CorexpError(f"MLflow tracking URI '{uri}' is unreachable ({type(err).__name__}); fix tracking.uri") from None
        return cls(spec, mlflow, exp.experiment_id)

    # -- names ------------------------------------------------------------------------------------------------
    def unique_name(self, name: str) -> str:
        """`name`, or `name #2`, `#3`, ... when the experiment has a run of that name (a forced rerun)."""
        pattern = name.replace("'", "''").split("%")[0]  # '_' matches itself as a LIKE wildcard
        taken = {r.info.run_name for r in self.client.search_runs([self.experiment_id],
                                                                  f"attributes.run_name LIKE '{pattern}%'")}
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name} #{n}"
        return unique

    # -- reading ----------------------------------------------------------------------------------------------
    def runs(self, filter_string: str = "") -> list[StoredRun]:
        return all_runs(self.client, [self.experiment_id], filter_string)

    def identity_runs(self, config_hash: str) -> list[StoredRun]:
        return self.runs(f"tags.config_hash = '{config_hash}'")

    # -- liveness ---------------------------------------------------------------------------------------------
    def alive(self, run: StoredRun) -> bool:
        return is_alive(run.tags, run.start_ms, self.spec.stale_after_s, here=self.here, run_id=run.run_id)

    def fail_stale_runs(self) -> int:
        """RUNNING job runs of the experiment whose process is provably gone (killed jobs): FAILED, with the reason."""
        stale = [r for r in self.runs("attributes.status = 'RUNNING'") if r.tags.get("sweep") != "parent" and not self.alive(r)]
        for r in stale:
            self.end(r.run_id, "its process is gone (killed, or its machine stopped) while RUNNING")
        return len(stale)

    def fail_killed_sweeps(self) -> int:
        """Sweep parent runs left RUNNING by a process that is provably gone (killed): FAILED, with the reason. A sweep
        running elsewhere or still alive is left alone; children are each job's to judge."""
        stale = 0
        for run in self.runs("tags.sweep = 'parent' and attributes.status = 'RUNNING'"):
            tags = {k[len("sweep_"):]: v for k, v in run.tags.items() if k.startswith("sweep_")}
            tags["heartbeat"] = run.tags.get("heartbeat", "")
            if not is_alive(tags, run.start_ms, float("inf"), here=self.here):  # no heartbeat rule for parents
                self.end(run.run_id, "the sweep's process was killed before it ended")
                stale += 1
        return stale

    # -- sweep parents ----------------------------------------------------------------------------------------
    def start_parent(self, name: str, tags: dict[str, str]) -> str:
        """A sweep's parent run (RUNNING until `end`), tagged with this process's identity and a heartbeat."""
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            "sweep": "parent", **tags, **{f"sweep_{k}": v for k, v in self.here.tags().items()},
            "heartbeat": f"{time.time():.0f}"})
        return run.info.run_id

    def end(self, run_id: str, failure: str = "") -> None:
        """Terminate a run: FINISHED, or FAILED with the reason as its `failure` tag."""
        if failure:
            self.client.set_tag(run_id, "failure", failure)
        self.client.set_terminated(run_id, status="FAILED" if failure else "FINISHED")

    # -- the identity claim -----------------------------------------------------------------------------------
    def claim(self, request: RunRequest, force: bool = False) -> Claim:
        """Skip a FINISHED identity, or start this process's run once no earlier live run of the identity exists."""
        ident = request.identity
        while True:
            stale = self.fail_stale_runs()
            if stale:  # any config's: a killed job's run must not stay RUNNING until its own config runs again
                log.warning("marked %d RUNNING run(s) FAILED: their processes are gone", stale)
            previous = self.identity_runs(ident.config_hash)
            done = [r for r in previous if r.status == "FINISHED" and r.code_digest == ident.code_digest]
            if done and not force:
                log.info("skipping: run %s already FINISHED this config with this code (force=true reruns it)", done[0].run_id)
                return Claim(finished=done[0])
            self._say_why(previous, ident)
            try:
                active = self._start(request)
            except Exception as err:
                store_full(err, self.spec.uri)
                raise
            if force:
                return Claim(run=active)
            now = [r for r in self.identity_runs(ident.config_hash) if r.code_digest == ident.code_digest]
            running = [r for r in now if r.status == "RUNNING" and (r.run_id == active.run_id or self.alive(r))]
            first = min(running, key=lambda r: (r.start_ms, r.run_id))
            finished_meanwhile = any(r.status == "FINISHED" for r in now)
            if first.run_id == active.run_id and not finished_meanwhile:
                return Claim(run=active)
            active.withdraw()
            if finished_meanwhile:  # another process finished it between the check above and this run's start
                continue
            self.wait_for(first)

    def _say_why(self, previous: list[StoredRun], ident: Identity) -> None:
        """One line when a config is computed again: other code, or other data under the same settings."""
        older = [r for r in previous if r.status == "FINISHED" and r.code_digest != ident.code_digest]
        if older:
            log.info("rerunning: the code changed since run %s of this config (code %s -> %s)", older[0].run_id,
                     older[0].code_digest or "none", ident.code_digest)
            return
        if ident.setup_hash:
            same_setup = [r for r in self.runs(f"tags.setup_hash = '{ident.setup_hash}'")
                          if r.status == "FINISHED" and r.code_digest == ident.code_digest
                          and r.tags.get("data_fingerprint") != ident.data_fingerprint]
            if same_setup:
                log.info("rerunning: the data changed since run %s of these settings (data %s -> %s)", same_setup[0].run_id,
                         same_setup[0].tags.get("data_fingerprint", "?"), ident.data_fingerprint)

    def wait_for(self, other: StoredRun, poll_s: float = 2.0) -> None:
        """Block while another process's run of the identity is RUNNING and alive, at most tracking.wait_limit_s."""
        limit = self.spec.wait_limit_s
        log.info("run %s of the same config and code is running (host %s, pid %s): waiting for it (at most %.0f s, "
                 "tracking.wait_limit_s), then skipping", other.run_id, other.tags.get("host"), other.tags.get("pid"), limit)
        deadline = time.time() + limit
        while True:
            run = StoredRun.of(self.client.get_run(other.run_id))
            if run.status != "RUNNING" or self.client.get_run(other.run_id).info.lifecycle_stage == "deleted":
                return
            if not self.alive(run):
                self.fail_stale_runs()
                return
            if time.time() > deadline:
                raise CorexpError(f"run {other.run_id} of the same config and code (host {other.tags.get('host')}, pid "
                                  f"{other.tags.get('pid')}) is still RUNNING after the {limit:.0f} s this job waits "
                                  "(tracking.wait_limit_s); wait longer, or stop that job, or set force=true to compute anyway")
            time.sleep(poll_s)

    def _start(self, request: RunRequest) -> ActiveRun:
        tags = {"config_hash": request.identity.config_hash, "code_digest": request.identity.code_digest,
                "setup_hash": request.identity.setup_hash, "data_fingerprint": request.identity.data_fingerprint,
                **self.here.tags(), "heartbeat": f"{time.time():.0f}", **request.tags}
        name = request.name if request.pinned_name else self.unique_name(request.name)
        run = self.mlflow.start_run(run_name=name, parent_run_id=request.parent_id, tags=tags)
        active = ActiveRun(self, run.info.run_id, run.info.run_name)
        active.log_params(request.params)
        self.mlflow.log_text(request.config_text, "config.yaml")
        return active

    def open_command(self, run_id: str) -> str:
        return open_command(self.spec.uri, self.experiment_id, run_id)



@dataclass
class ActiveRun:
    """This process's RUNNING run: heartbeat, logging, and its end (FINISHED, or FAILED with the reason)."""

    tracker: Tracker
    run_id: str
    name: str
    metrics: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def running(self) -> Iterator[ActiveRun]:
        """While the body runs: a heartbeat, SIGTERM as an exception; then FINISHED, or FAILED tagged with why."""
        mlflow = self.tracker.mlflow
        try:
            with self.heartbeat(), terminate_as_exception():
                yield self
        except BaseException as err:
            with contextlib.suppress(Exception):  # the reason, where the UI shows it; never hides the failure itself
                mlflow.set_tag("failure", one_line(err)[:4000])
            mlflow.end_run(status="FAILED")
            raise
        mlflow.end_run(status="FINISHED")

    @contextlib.contextmanager
    def heartbeat(self, every_s: float = HEARTBEAT_S) -> Iterator[None]:
        """Refresh the run's `heartbeat` tag while the body runs (other machines tell a live job from a killed one by it)."""
        stop = threading.Event()
        client = self.tracker.client

        def beat() -> None:
            while not stop.wait(every_s):
                with contextlib.suppress(Exception):  # a missed beat only makes the run look older to others
                    client.set_tag(self.run_id, "heartbeat", f"{time.time():.0f}")

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def withdraw(self) -> None:
        """Give the identity to an earlier run: end and delete this one."""
        self.tracker.mlflow.end_run(status="KILLED")
        self.tracker.client.delete_run(self.run_id)

    def log_params(self, params: dict[str, str]) -> None:
        keys = list(params)
        for i in range(0, len(keys), 100):
            self.tracker.mlflow.log_params({k: params[k][:6000] for k in keys[i:i + 100]})

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tracker.mlflow.set_tags(tags)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self.metrics.update(metrics)
        self.tracker.mlflow.log_metrics(metrics)

    def log_artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            self.tracker.mlflow.log_artifact(str(path))

    def log_dict(self, obj: Any, name: str) -> None:
        self.tracker.mlflow.log_dict(obj, name)

    def log_dataset(self, name: str, source_uri: str, digest: str, attempts: int = 4) -> None:
        """An MLflow dataset input (the runs table's Dataset column and filter), tolerating MLflow's race on a new data
        set: the tracking server checks whether the data set exists and then inserts it, so jobs that log the same
        new data set at once can get `UNIQUE constraint failed: datasets...`; a retry only links it to the run."""
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset

        dataset = MetaDataset(HTTPDatasetSource(source_uri), name=name, digest=digest)
        for attempt in range(attempts):
            try:
                self.tracker.mlflow.log_input(dataset, context="evaluation")
                return
            except Exception as err:
                if "UNIQUE constraint failed: datasets" not in str(err) or attempt == attempts - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))


class Terminated(BaseException):
    """SIGTERM (a scheduler's cancel, `kill`): raised in the job so that its run is closed as FAILED with the reason."""

    def __str__(self) -> str:
        return "terminated by SIGTERM (a scheduler's cancel or `kill`)"


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """While the body runs in the main thread, SIGTERM raises Terminated instead of ending the process unannounced."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- reading a store without creating one (the report, the studies) --------------------------------------------------
class Store:
    """An existing MLflow store, read only (but for `amend`): never creates a database, a folder or an experiment."""

    def __init__(self, uri: str):
        import mlflow

        db = _sqlite_path(uri)
        if db is not None and not db.is_file():
            raise CorexpError(f"no MLflow store at {db} (--tracking-uri {uri}); give the sqlite:/// URI of the store the "
                              "jobs logged to (default: <project root>/mlflow.db)")
        if uri.startswith(("http://", "https://")):
            check_server(uri)
        elif "://" not in uri and not Path(uri).is_dir():
            raise CorexpError(f"no MLflow store at {uri}; give the tracking URI the jobs logged to")
        mlflow.set_tracking_uri(uri)
        self.uri = uri
        self.mlflow = mlflow
        self.client = mlflow.MlflowClient()

    def experiment_ids(self, names: list[str]) -> list[str]:
        ids = []
        for name in names:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                known = sorted(e.name for e in self.client.search_experiments())
                raise CorexpError(f"experiment '{name}' is not in {self.uri}; experiments there: {', '.join(known) or 'none'}")
            ids.append(exp.experiment_id)
        return ids

    def finished_runs(self, experiments: list[str]) -> list[StoredRun]:
        """FINISHED job runs (sweep parents left out) of the experiments."""
        runs = all_runs(self.client, self.experiment_ids(experiments), "attributes.status = 'FINISHED'")
        return [r for r in runs if r.tags.get("sweep") != "parent"]

    def artifact(self, run_id: str, path: str) -> Path:
        """A run's artifact as a local file (downloaded when the store is remote)."""
        return Path(self.client.download_artifacts(run_id, path))

    def amend(self, run_id: str, params: dict[str, str], tags: dict[str, str]) -> None:
        """Add params (names the run has not logged) and set tags of an existing run: the store's one write, used by
        `python -m corexp.migrate` to bring runs of older corexp up to date."""
        from mlflow.entities import Param, RunTag

        try:
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                                  tags=[RunTag(k, v) for k, v in tags.items()])
        except Exception as err:
            store_full(err, self.uri)
            raise
