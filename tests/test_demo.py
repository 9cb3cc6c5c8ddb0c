"""`tricoclr demo --quick`, end to end through the real CLI: synthesize, prepare, train, evaluate.

One run (~1.5 min on 2 CPU cores) checks the JSON contract the issue names, the table, the figure
and the TensorBoard logs; a second run into the same folder must reuse every finished step and
reproduce the same table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from tricoclr.demo import VARIANTS, slug

pytestmark = pytest.mark.slow

REQUIRED_KEYS = {"model", "modalities", "R@1", "R@5", "R@10", "linear_top1"}


def _demo(out: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "tricoclr.cli", "demo", "--quick", "--out", str(out), "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=out.parent,  # not the repository: paths must resolve anyway
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _encoder_files(out: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted((out / "runs").rglob("*.safetensors"))}


def test_quick_demo_writes_the_ablation_and_reuses_finished_work(tmp_path):
    out = tmp_path / "demo"
    printed = _demo(out)
    assert "settings:" in printed and "Farneback" in printed  # it says what it uses

    results = json.loads((out / "results.json").read_text())
    rows = {row["model"]: row for row in results["rows"]}
    expected = {"random init", "InfoNCE (pre-training only)"} | {name for name, _, _ in VARIANTS}
    assert set(rows) == expected
    for row in rows.values():
        assert REQUIRED_KEYS <= set(row)
        assert 0.0 <= row["R@1"] <= row["R@5"] <= row["R@10"] <= 100.0
        assert 0.0 <= row["linear_top1"] <= 100.0
        low, high = row["R@1_ci"]
        assert low <= row["R@1"] <= high
    assert rows["TriCoCLR"]["modalities"] == "RGB+Flow+Audio"
    assert rows["CoCLR"]["modalities"] == "RGB+Flow"
    assert rows["InfoNCE"]["modalities"] == "RGB"
    assert rows["TriCoCLR, standardized oracle"]["modalities"] == "RGB+Flow+Audio"
    # Each row's extra overrides reach its training run (the resolved config records them).
    resolved = yaml.safe_load(
        (out / "runs" / "seed0" / slug("TriCoCLR, standardized oracle") / "config.yaml").read_text()
    )
    assert resolved["method"]["oracle_similarity"] == "standardized"
    resolved = yaml.safe_load((out / "runs" / "seed0" / slug("TriCoCLR") / "config.yaml").read_text())
    assert resolved["method"]["oracle_similarity"] == "cosine_sum"
    assert results["num_test"] > 0 and results["num_train"] > 0
    # The ablation's paired differences: same test videos, so the difference of means is exact.
    pairs = {(c["a"], c["b"]): c for c in results["comparisons"]}
    assert {("CoCLR", "InfoNCE"), ("TriCoCLR", "CoCLR"), ("TriCoCLR", "TriCoCLR, no self-positive mask")} <= set(pairs)
    for (a, b), c in pairs.items():
        for metric in ("R@1", "linear_top1"):
            assert c[metric] == pytest.approx(rows[a][metric] - rows[b][metric], abs=1e-6)
            assert c[f"{metric}_ci"][0] <= c[metric] <= c[f"{metric}_ci"][1]

    table = (out / "results.md").read_text()
    assert all(name in table for name in expected)
    assert "Paired differences" in table and "TriCoCLR − CoCLR" in table
    assert (out / "retrieval.png").stat().st_size > 1000
    assert list((out / "runs").rglob("events.out.tfevents.*")), "no TensorBoard logs"

    # Re-running reuses the data, every trained encoder and the feature cache.
    before = _encoder_files(out)
    assert before
    printed_again = _demo(out)
    assert "InfoNCE pre-training of" not in printed_again and "synthesizing" not in printed_again
    assert "cycle1-rgb for" not in printed_again
    assert _encoder_files(out) == before
    again = json.loads((out / "results.json").read_text())
    assert [row["R@1"] for row in again["rows"]] == [row["R@1"] for row in results["rows"]]
    assert [row["linear_top1"] for row in again["rows"]] == [row["linear_top1"] for row in results["rows"]]

    # benchmarks/stage_length.py trains the demo's InfoNCE, CoCLR and TriCoCLR rows again with another
    # RGB stage length from the same pre-trained encoders, evaluated the same way.
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "stage_length.py"), "--demo-out", str(out), "--quick"]
        + ["--epochs", "1", "--seeds", "1", "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "InfoNCE pre-training of" not in result.stdout  # the demo's pre-training is reused
    longer = json.loads((out / "stage_length_E1" / "results.json").read_text())
    longer_rows = {row["model"]: row for row in longer["rows"]}
    assert set(longer_rows) == {"random init", "InfoNCE", "CoCLR", "TriCoCLR", "InfoNCE (pre-training only)"}
    for unchanged in ("random init", "InfoNCE (pre-training only)"):  # same encoders, same evaluation
        assert longer_rows[unchanged]["R@1"] == rows[unchanged]["R@1"]
        assert longer_rows[unchanged]["linear_top1"] == rows[unchanged]["linear_top1"]
    resolved = yaml.safe_load((out / "stage_length_E1" / "runs" / "seed0" / "tricoclr" / "config.yaml").read_text())
    assert resolved["schedule"]["pretrain_epochs"] == 1 and resolved["schedule"]["stage_epochs"] == 1
