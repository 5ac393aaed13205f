"""Check every converted model in the cache byte for byte: `python -m corexp.verify_cache [--cache DIR]`.

Jobs check a converted model on every use against the sizes and sha256 recorded at conversion, re-hashing a file only
when its size, mtime, inode or ctime changed (corexp.files.content_sha256). This command hashes every file again,
whatever its metadata says (bit rot, a restored backup), and prints one line per model: ok, or what is wrong and the
fix. Exit 1 when any model is damaged; a job then converts it again on its next use.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from corexp.engine.models import cache_problem


def main(argv: list[str] | None = None) -> int:
    default = os.environ.get("COREXP_CACHE", str(Path.home() / ".cache" / "corexp"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=default, help=f"the cache folder (paths.cache_dir; default {default})")
    args = ap.parse_args(argv)
    folders = sorted(p for p in (Path(args.cache) / "models").glob("*") if p.is_dir() and not p.name.startswith("."))
    if not folders:
        print(f"corexp.verify_cache: no converted model in {Path(args.cache) / 'models'}")
        return 0
    damaged = 0
    for folder in folders:
        problem = cache_problem(folder, None, full=True)
        damaged += problem is not None
        print(f"{folder.name}: " + ("ok" if problem is None else f"{problem}; it is converted again on its next use "
                                    f"(or delete {folder})"))
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(main())
