"""Run every benchmark with short settings; write one JSON file of every ratio and its target.

Benches are discovered, not listed: every ``bench/bench_*.py`` and ``bench/gpu_*.py``. Each runs in
its own process with its short arguments: the ``SHORT_ARGS = [...]`` list a bench declares at
module level (read without importing it), else the fallback below, else none. Its last stdout
line is its JSON result. Targets come from the bench's own JSON (``"targets": {metric: bound}``;
a bound is a maximum, or ``{"min": x}`` for a minimum) plus the project's targets below (issue
16), matched to metrics by name. A bench that fails, times out or prints no JSON is a row with
its error; so is a target whose metric a bench did not report.

    python bench/run_all.py [--out bench/run_all.json] [--only block,sampler] [--timeout 900] [--markdown]

With ``--only``, the other benches' rows of an existing ``--out`` file are kept (a rerun).

Exit status 0 even when targets are missed (the JSON says which); 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: Short arguments for benches that do not declare ``SHORT_ARGS`` themselves.
FALLBACK_SHORT_ARGS = {
    "bench_sampler": ["--steps", "4", "--repeats", "2"],
    "bench_reference": ["--steps", "8", "--repeats", "1", "--mem-steps", "1"],
    "bench_native": ["--size", "256", "--repeats", "2"],
    "bench_eval": ["--size", "512", "--repeats", "2"],
    "bench_train": ["--steps", "3"],
}

#: Project targets (issue 16) by bench and metric; a bench's own JSON targets are added to these.
PROJECT_TARGETS = {
    "bench_sampler": {"time_ratio": 1.02},
    "bench_node": {"node_over_direct": 1.02},  # the HAIRDIFF_MODEL node's, kept for older rows
    "bench_native": {"native_over_core_time": 1.02, "native_over_core_memory": 1.0},
    "bench_block": {
        "large_once_over_off_budget": 1.10,
        "large_per_step_over_off": 2.05,
        "large_mem_once_over_off": 1.05,
    },
    "gpu_attention_check": {"large_bias_over_fused": {"min": 1.5}},
}


def derived_metrics(name: str, result: dict) -> dict:
    """Ratios some benches report only as parts (kept here so the benches stay untouched)."""
    out = {}
    if name == "bench_node" and result.get("direct_s"):
        # Older bench_node output has only the medians; newer reports the paired-round ratio itself.
        out["node_over_direct"] = result.get("node_over_direct") or round(result["node_s"] / result["direct_s"], 4)
        if "budget_pct" in result:
            out.setdefault("_targets", {})["node_over_direct_budget"] = 1 + result["budget_pct"] / 100
            out["node_over_direct_budget"] = out["node_over_direct"]
    if name == "bench_eval" and "target_s" in result and "seconds_per_result_with_outputs" in result:
        out.setdefault("_targets", {})["seconds_per_result_with_outputs"] = result["target_s"]
    return out


def short_args(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "SHORT_ARGS" for t in node.targets):
            value = ast.literal_eval(node.value)
            return [str(v) for v in value]
    return list(FALLBACK_SHORT_ARGS.get(os.path.splitext(os.path.basename(path))[0], []))


def discover(only: set[str] | None, directory: str = HERE) -> list[str]:
    names = sorted(
        f for f in os.listdir(directory) if f.endswith(".py") and (f.startswith("bench_") or f.startswith("gpu_"))
    )
    paths = [os.path.join(directory, f) for f in names]
    if only:
        paths = [p for p in paths if _short(p) in only]
    return paths


def _short(path: str) -> str:
    name = os.path.splitext(os.path.basename(path))[0]
    return name[len("bench_") :] if name.startswith("bench_") else name


def run_one(path: str, timeout: float) -> dict:
    name = os.path.splitext(os.path.basename(path))[0]
    args = short_args(path)
    row: dict = {"bench": name, "args": args}
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TQDM_DISABLE="1")
    try:
        proc = subprocess.run(
            [sys.executable, path, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
        )
    except subprocess.TimeoutExpired:
        row.update(error=f"timed out after {timeout:.0f} s", seconds=round(time.perf_counter() - t0, 1))
        return row
    row["seconds"] = round(time.perf_counter() - t0, 1)
    result = None
    for line in reversed(proc.stdout.strip().splitlines()):
        try:
            result = json.loads(line)
            break
        except json.JSONDecodeError:
            continue
    if name.startswith("gpu_") and proc.returncode == 2 and "no CUDA" in proc.stdout + proc.stderr:
        # A GPU check on a machine without one: not run, not a failure.
        row["result"] = {"skipped": "no CUDA device: run it on a GPU machine (bench/gpu_run.sh)"}
        return row
    if proc.returncode != 0 or not isinstance(result, dict):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        row["error"] = (
            f"exit {proc.returncode}" + (f": {' | '.join(tail)}" if tail else "")
            if proc.returncode
            else "no JSON line on stdout"
        )
        return row
    row["result"] = result
    return row


def check_targets(row: dict) -> list[dict]:
    """One entry per target: metric, value, bound, kind (max/min), ok (None when not measured)."""
    result = row.get("result") or {}
    extra = derived_metrics(row["bench"], result)
    declared = dict(extra.pop("_targets", {}))
    declared.update(result.get("targets") or {})
    values = {**result, **extra}
    checks = []
    sources = [("bench", declared), ("project", PROJECT_TARGETS.get(row["bench"], {}))]
    for source, targets in sources:
        for metric, bound in targets.items():
            if source == "project" and declared.get(metric) == bound:
                continue  # the bench already declares this very target
            kind, limit = ("min", bound["min"]) if isinstance(bound, dict) and "min" in bound else ("max", bound)
            value = values.get(metric)
            entry = {"metric": metric, "target": limit, "kind": kind, "source": source, "value": value}
            if isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(limit, (int, float)):
                entry["ok"] = value <= limit if kind == "max" else value >= limit
            else:
                entry["ok"] = None
                entry["note"] = row.get("error") or result.get("skipped") or "metric not reported"
            checks.append(entry)
    return checks


def environment() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def markdown(report: dict) -> str:
    lines = ["| bench | metric | value | target | ok |", "|---|---|---|---|---|"]
    for row in report["benches"]:
        if not row["targets"]:
            status = row.get("error") or (row.get("result") or {}).get("skipped") or "no targets"
            lines.append(f"| {row['bench']} | - | - | - | {status} |")
        for t in row["targets"]:
            bound = ("<= " if t["kind"] == "max" else ">= ") + str(t["target"])
            ok = {True: "yes", False: "**no**", None: t.get("note", "-")}[t["ok"]]
            lines.append(
                f"| {row['bench']} | {t['metric']} ({t['source']}) | {t['value'] if t['value'] is not None else '-'} | {bound} | {ok} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(HERE, "run_all.json"))
    p.add_argument("--only", default="", help="comma-separated bench names (e.g. block,sampler)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per bench")
    p.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    p.add_argument("--dir", default=HERE, help=argparse.SUPPRESS)  # tests point it at fake benches
    args = p.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()} or None
    report = {"environment": environment(), "benches": []}
    kept = []
    if only and os.path.exists(args.out):  # rerun some benches: keep the other rows of the last run
        with open(args.out, encoding="utf-8") as f:
            previous = json.load(f)
        kept = [r for r in previous.get("benches", []) if _short(r["bench"] + ".py") not in only]
        report["environment"]["kept_rows_from"] = previous.get("environment", {}).get("date_utc")
    for path in discover(only, args.dir):
        row = run_one(path, args.timeout)
        row["targets"] = check_targets(row)
        report["benches"].append(row)
        print(f"{row['bench']}: {row.get('error') or 'ok'} ({row.get('seconds', 0)} s)", file=sys.stderr)
    report["benches"] = sorted(kept + report["benches"], key=lambda r: r["bench"])
    report["environment"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    checks = [t for r in report["benches"] for t in r["targets"]]
    report["summary"] = {
        "targets": len(checks),
        "met": sum(t["ok"] is True for t in checks),
        "missed": sum(t["ok"] is False for t in checks),
        "not_measured": sum(t["ok"] is None for t in checks),
    }
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, args.out)
    if args.markdown:
        print(markdown(report))
    print(json.dumps(report["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
