"""Bring the runs of an older corexp up to date with component keys:

    python -m corexp.migrate --experiment scaling [--experiment transfer ...] [--identity] [--tracking-uri URI] [--dry-run]

Since runs are identified, named and labelled by their components' keys (corexp.tracking.identity.RunKey), the report
reads each run's keys from its `key.<group>` params. For each FINISHED job run without them, the migration rebuilds the
job from the run's logged config.yaml with the current code (the door, Job.from_config: nothing is loaded) and adds its
keys as params; it prints every report label that changes (labels of older corexp left out the detection data).

With --identity it also re-keys each run's identity (config_hash and setup_hash from the keys and the run's logged data
fingerprint; the former hash kept in `config_hash.before_keys`), so that a later job of the same config finds the run.
Configs that older identities told apart only by settings added since (runs of one config under two hashes) then
become one, and the report keeps one run of them: its tables can change, which is why it is not the default. Runs
whose config no longer builds, or builds into other settings than the run logged (a setting whose meaning changed:
`heads=qrhead` before heads.variant computed QR-R), are listed and left alone; head-atlas runs (tag study=atlas) too.
"""

from __future__ import annotations

import argparse
import collections

from corexp.errors import CorexpError, cli_main, one_line
from corexp.locations import project_root
from corexp.tracking import names
from corexp.tracking.identity import KEY_PARAM, RunKey
from corexp.tracking.tracker import Store, StoredRun

RESOLVED = ("model.dtype", "heads.tau")  # logged as configured by older corexp, resolved at the door now (auto, null)


def rekey(store: Store, run: StoredRun) -> tuple[dict[str, str], dict[str, str], str]:
    """The key params and identity tags a run of an older corexp gets, and its label as the keys say it."""
    from corexp.config import logged_config
    from corexp.job import Job

    key = Job.from_config(logged_config(store.artifact(run.run_id, "config.yaml").read_text())).run_key()
    if "data_fingerprint" not in run.tags:
        raise CorexpError("the run has no data_fingerprint tag")
    if run.params.get("heads.name") == "qrhead" and "heads.variant" not in run.params:
        raise CorexpError("logged by the old heads=qrhead, which computed QR-R (the uncalibrated mass on the positive): "
                          "rerun it as heads=qr_r")
    rebuilt = key.params()
    changed = sorted(k for k, v in run.params.items() if k in rebuilt and rebuilt[k] != v and k not in RESOLVED
                     and not k.startswith(KEY_PARAM))  # where data was read from is not in a key, so not rebuilt
    if changed:
        raise CorexpError("its config builds into other settings than it logged (" + ", ".join(
            f"{k}: {run.params[k]} -> {rebuilt[k]}" for k in changed[:3]) + "): the code changed their meaning; rerun it")
    ident = key.identity_of(run.tags["data_fingerprint"], run.code_digest)
    params = {name: value for name, value in rebuilt.items() if name.startswith(KEY_PARAM)}
    tags = {"config_hash": ident.config_hash, "setup_hash": ident.setup_hash,
            "config_hash.before_keys": run.tags.get("config_hash", "")}
    return params, tags, names.method_label(key)


def migrate(store: Store, experiments: list[str], identity: bool = False, dry_run: bool = False) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    relabelled: collections.Counter = collections.Counter()
    for run in store.finished_runs(experiments):
        if run.tags.get("study") == "atlas" or RunKey.from_params(run.params) is not None:
            counts["up to date" if run.tags.get("study") != "atlas" else "atlas (left alone)"] += 1
            continue
        try:
            params, tags, label = rekey(store, run)
        except Exception as err:
            counts["left alone"] += 1
            print(f"left alone: {run.name} ({run.run_id}): {one_line(err)}")
            continue
        if label != run.tags.get("method_label"):
            relabelled[(run.tags.get("method_label", "?"), label)] += 1
        if not dry_run:
            store.amend(run.run_id, params, tags if identity else {})
        counts["keyed"] += 1
    for (before, after), n in sorted(relabelled.items()):
        print(f"label: {before} -> {after} ({n} runs)")
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m corexp.migrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", action="append", required=True, help="MLflow experiment (repeatable)")
    ap.add_argument("--tracking-uri", default=f"sqlite:///{project_root() / 'mlflow.db'}")
    ap.add_argument("--identity", action="store_true", help="also re-key each run's identity (may merge configs)")
    ap.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    args = ap.parse_args(argv)

    def body() -> None:
        counts = migrate(Store(args.tracking_uri), args.experiment, args.identity, args.dry_run)
        print(("dry run" if args.dry_run else "done") + ": " + ", ".join(f"{n} {what}" for what, n in sorted(counts.items())))

    return cli_main("corexp.migrate", body)


if __name__ == "__main__":
    raise SystemExit(main())
