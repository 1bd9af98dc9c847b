"""bench/run_all.py: discovery, short arguments, targets from the bench's JSON, errors as rows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

_spec = importlib.util.spec_from_file_location("run_all", Path(__file__).parents[1] / "bench" / "run_all.py")
run_all = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_all)

GOOD = """import json, sys
SHORT_ARGS = ["--fast", 3]
print("noise before the result")
print(json.dumps({"argv": sys.argv[1:], "ratio": 1.5, "speedup": 2.0,
                  "targets": {"ratio": 1.25, "speedup": {"min": 1.5}, "absent": 1.0}}))
"""


def test_run_all_rows_targets_and_errors(tmp_path, capsys):
    (tmp_path / "bench_good.py").write_text(GOOD)
    (tmp_path / "bench_crash.py").write_text("raise SystemExit('broken on purpose')\n")
    (tmp_path / "bench_silent.py").write_text("print('no json here')\n")
    (tmp_path / "gpu_check.py").write_text("import json; print(json.dumps({'skipped': 'no CUDA device'}))\n")
    (tmp_path / "gpu_exit2.py").write_text(
        "import sys; print('no CUDA device is visible', file=sys.stderr); sys.exit(2)\n"
    )
    (tmp_path / "gpu_broken.py").write_text("import sys; sys.exit(2)\n")  # exit 2 for another reason: an error
    (tmp_path / "helper.py").write_text("raise RuntimeError('not a bench: never run')\n")
    out = tmp_path / "all.json"
    assert run_all.main(["--dir", str(tmp_path), "--out", str(out), "--markdown"]) == 0
    report = json.loads(out.read_text())
    rows = {r["bench"]: r for r in report["benches"]}
    assert sorted(rows) == ["bench_crash", "bench_good", "bench_silent", "gpu_broken", "gpu_check", "gpu_exit2"]
    assert "no CUDA" in rows["gpu_exit2"]["result"]["skipped"] and "error" not in rows["gpu_exit2"]
    assert rows["gpu_broken"]["error"] == "exit 2"
    good = rows["bench_good"]
    assert good["result"]["argv"] == ["--fast", "3"]  # its own SHORT_ARGS
    checks = {t["metric"]: t for t in good["targets"]}
    assert checks["ratio"]["ok"] is False and checks["speedup"]["ok"] is True and checks["absent"]["ok"] is None
    assert "broken on purpose" in rows["bench_crash"]["error"]
    assert rows["bench_silent"]["error"] == "no JSON line on stdout"
    assert rows["gpu_check"]["result"]["skipped"] == "no CUDA device"
    assert report["summary"] == {"targets": 3, "met": 1, "missed": 1, "not_measured": 1}
    assert report["environment"]["torch"]
    table = capsys.readouterr().out
    assert "| bench_good | ratio (bench) | 1.5 | <= 1.25 | **no** |" in table
    assert "| bench_crash | - | - | - | exit 1: broken on purpose |" in table
    # A rerun of one bench keeps the other rows of the last run.
    (tmp_path / "bench_crash.py").write_text("import json; print(json.dumps({'fixed': 1}))\n")
    assert run_all.main(["--dir", str(tmp_path), "--out", str(out), "--only", "crash"]) == 0
    rows = {r["bench"]: r for r in json.loads(out.read_text())["benches"]}
    assert rows["bench_crash"]["result"] == {"fixed": 1} and rows["bench_good"]["result"]["ratio"] == 1.5


def test_project_targets_match_reported_metrics():
    row = {"bench": "bench_node", "result": {"direct_s": 2.0, "node_s": 2.02, "budget_pct": 5.0}}
    checks = {t["metric"]: t for t in run_all.check_targets(row)}
    assert len(run_all.check_targets(row)) == 2
    assert checks["node_over_direct"]["value"] == 1.01 and checks["node_over_direct"]["ok"] is True
    assert checks["node_over_direct_budget"]["target"] == 1.05
    # the bench's own paired-round ratio wins over the ratio of its medians
    row["result"]["node_over_direct"] = 1.03
    checks = {t["metric"]: t for t in run_all.check_targets(row)}
    assert checks["node_over_direct"]["value"] == 1.03 and checks["node_over_direct"]["ok"] is False
    # the same target declared by the bench and the project is one row
    row = {
        "bench": "gpu_attention_check",
        "result": {"large_bias_over_fused": 2.0, "targets": {"large_bias_over_fused": {"min": 1.5}}},
    }
    assert [t["source"] for t in run_all.check_targets(row)] == ["bench"]
