"""The scheduler's simulation, long (issue 25, item 4): tests/sim_machine.py's machine with many examples.

    .venv/bin/python -m bench.simulate --examples 20000 [--steps 40] [--checks ci|all|NAME,...] [--seed N]
    .venv/bin/python -m bench.simulate --find [--examples 2000] [--seeds 5]

The first runs the machine (the same one CI runs with 200 examples) for ``--examples`` examples of up to
``--steps`` steps and prints the examples run, the time, examples per second and the failure found, if
any, with hypothesis's shrunk falsifying example. ``--seed``: a random run from that seed (default: the
derandomized run CI makes, extended).

``--find`` is the defect record: for each check that a defect of issue 25 breaks, the machine with that check
alone, from ``--seeds`` seeds, up to ``--examples`` each, no shrinking: whether it fails and after how many
examples (machines made before the first failed check). Results go to bench/results/simulate.json too.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import traceback
from typing import Any

import hypothesis.core
from hypothesis import HealthCheck, Phase, Verbosity, settings
from hypothesis.stateful import run_state_machine_as_test

from bench.common import save, table
from tests import sim_machine as sim

# the defects of issue 25 that live in the manager, and the check each breaks
DEFECTS = {
    "1: a starting model not counted in admission": sim.CAPACITY,
    "3: a user's keep_alive overrides an admin's pin": sim.ADMIN_PIN,
    "4: a request given up in the queue stays there": sim.GONE_LEAVES,
    "5: keep_alive lost in its own num_ctx reload": sim.OWN_KEEP_ALIVE,
    "7: requests built from the old config after a reload": sim.CURRENT_CONFIG,
}


def checks_of(text: str) -> frozenset[str]:
    if text == "all":
        return sim.ALL_CHECKS
    if text == "ci":
        from tests.test_simulation import CI_CHECKS

        return CI_CHECKS
    names = frozenset(text.split(","))
    unknown = names - sim.ALL_CHECKS
    if unknown:
        raise SystemExit(f"unknown checks: {', '.join(sorted(unknown))}; known: {', '.join(sorted(sim.ALL_CHECKS))}")
    return names


def run(
    checks: frozenset[str], examples: int, steps: int, seed: int | None, shrink: bool, quiet: bool
) -> dict[str, Any]:
    """One run of the machine: examples made, seconds, the first failure's example number and message."""
    machine = sim.machine(checks)
    hypothesis.core.global_force_seed = seed  # what pytest's --hypothesis-seed sets
    phases = (Phase.generate, Phase.shrink) if shrink else (Phase.generate,)
    chosen = settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        derandomize=seed is None,
        database=None,
        phases=phases,
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet if quiet else Verbosity.normal,
    )
    began, cpu = time.perf_counter(), time.process_time()
    error: str | None = None
    try:
        run_state_machine_as_test(machine, settings=chosen)
    except Exception as exc:  # a failed check (AssertionError), or whatever the manager raised
        error = "".join(traceback.format_exception_only(exc)).strip()
    finally:
        hypothesis.core.global_force_seed = None
    seconds = time.perf_counter() - began
    cpu = time.process_time() - cpu  # on a shared machine the wall time says more of the others' load
    made = machine.machines
    first = machine.first_failure if error is not None else None
    if error is not None and first is None:
        first = made  # an exception outside the checks (the manager's own): counted where the run stopped
    return {"machines": made, "seconds": seconds, "cpu_seconds": cpu, "first_failure": first, "error": error}


def long_run(args: argparse.Namespace) -> None:
    checks = checks_of(args.checks)
    result = run(checks, args.examples, args.steps, args.seed, shrink=True, quiet=False)
    rate = result["machines"] / result["seconds"] if result["seconds"] else 0.0
    rows = [
        ("checks", ", ".join(sorted(checks))),
        ("examples asked", str(args.examples)),
        ("steps per example", f"up to {args.steps}"),
        ("seed", "derandomized (as CI)" if args.seed is None else str(args.seed)),
        ("examples run", f"{result['machines']} (shrinking included)"),
        ("time", f"{result['seconds']:.1f} s wall, {result['cpu_seconds']:.1f} s CPU"),
        ("examples/s", f"{rate:.1f} (per CPU second: {result['machines'] / max(result['cpu_seconds'], 1e-9):.1f})"),
        ("failure", result["error"] or "none"),
    ]
    if result["first_failure"] is not None:
        rows.append(("found at example", str(result["first_failure"])))
    print(table(rows))
    save("simulate", {"long_run": {**result, "examples": args.examples, "steps": args.steps, "seed": args.seed}})


def find(args: argparse.Namespace) -> None:
    rows: list[tuple[str, str]] = []
    record: dict[str, Any] = {}
    for defect, check in DEFECTS.items():
        if check == sim.ADMIN_PIN and sim.ROLE_PARAM is None:
            summary = "not checkable: ModelManager.acquire takes no caller's role here"
            rows.append((f"{defect} [{check}]", summary))
            print(f"{defect} [{check}]: {summary}", flush=True)
            continue
        found: list[int] = []
        errors: list[str] = []
        seconds = 0.0
        for seed in range(args.seeds):
            result = run(frozenset({check}), args.examples, args.steps, seed, shrink=False, quiet=True)
            seconds += result["seconds"]
            if result["first_failure"] is not None:
                found.append(result["first_failure"])
                errors.append(str(result["error"]).splitlines()[-1][:160])
        if found:
            summary = (
                f"found by {len(found)}/{args.seeds} seeds; examples: median {statistics.median(found):g}, "
                f"min {min(found)}, max {max(found)} ({seconds:.0f} s)"
            )
        else:
            summary = f"not found in {args.seeds} x {args.examples} examples ({seconds:.0f} s)"
        rows.append((f"{defect} [{check}]", summary))
        record[defect] = {"check": check, "found": found, "seeds": args.seeds, "errors": errors, "seconds": seconds}
        print(f"{defect} [{check}]: {summary}" + (f"\n    e.g. {errors[0]}" if errors else ""), flush=True)
    print()
    print(table(rows))
    save("simulate", {"find": record, "examples": args.examples, "steps": args.steps})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--checks", default="ci", help="ci (what CI runs), all, or names separated by commas")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--find", action="store_true", help="the defect record: each defect's check alone")
    parser.add_argument("--seeds", type=int, default=5, help="--find: seeds per check")
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)  # the manager logs failed loads and starts short of memory by the thousand
    if args.find:
        find(args)
    else:
        long_run(args)


if __name__ == "__main__":
    main()
