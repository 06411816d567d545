"""Compare the running interpreter's installed distributions with lock files; exit 1 on any difference.

    .venv/bin/python scripts/check_lock.py locks/test.txt locks/models.txt
    .venv/bin/python scripts/check_lock.py --prune locks/runtime.txt locks/models.txt

Every locked name must be installed at exactly its locked version, and nothing else may be
installed but pip and this project itself. ``--prune`` uninstalls what is installed and not locked
(what a reused venv keeps from an earlier, larger install) before comparing. Standard library only.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ALWAYS_ALLOWED = {"pip", "llm-lifecycle-proxy"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)", line)
        if match is None:
            raise SystemExit(f"{path}: not an exact pin: {raw!r}")
        pins[normalize(match.group(1))] = match.group(3)
    return pins


def installed() -> dict[str, str]:
    return {normalize(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def main(argv: list[str]) -> int:
    prune = "--prune" in argv
    locks = [Path(a) for a in argv if a != "--prune"]
    if not locks:
        print(__doc__, file=sys.stderr)
        return 2
    wanted: dict[str, str] = {}
    for lock in locks:
        wanted.update(read_lock(lock))
    have = installed()
    extra = sorted(set(have) - set(wanted) - ALWAYS_ALLOWED)
    if prune and extra:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "--quiet", "--yes", *extra], check=True)
        have = installed()
        extra = sorted(set(have) - set(wanted) - ALWAYS_ALLOWED)
    problems = [f"missing: {name}=={version}" for name, version in sorted(wanted.items()) if name not in have]
    problems += [
        f"differs: {name} {have[name]} installed, {version} locked"
        for name, version in sorted(wanted.items())
        if name in have and have[name] != version
    ]
    problems += [f"not locked: {name}=={have[name]}" for name in extra]
    where = ", ".join(str(lock) for lock in locks)
    if problems:
        print(f"{sys.prefix} does not match {where}:", *problems, sep="\n  ", file=sys.stderr)
        return 1
    print(f"{sys.prefix} matches {where} ({len(wanted)} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
