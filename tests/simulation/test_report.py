"""Trust sections of report.json / report.md and their plots, from a variant's trust.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedguard.simulation.report import write_report
from fedguard.simulation.runner import SiloPlan, VariantResult
from fedguard.trust.results import write_trust_results
from tests.factories import small_config
from tests.trust.samples import sample_results


def _history(rounds: int) -> list[dict[str, Any]]:
    return [
        {
            "round": r,
            "sampled": 3,
            "evaluation": {"accuracy": 0.9, "auc": 0.95, "loss": 0.3},
            "outcomes": [{"silo_id": f"silo-{i}", "status": "ok", "reason": ""} for i in range(3)],
        }
        for r in range(rounds + 1)
    ]


def _write(tmp_path: Path, with_trust: bool) -> tuple[dict[str, Path], dict[str, Any], str]:
    config = small_config(tmp_path)
    run_dir = tmp_path / "run"
    variant_dir = run_dir / "no-dp"
    variant_dir.mkdir(parents=True)
    if with_trust:
        write_trust_results(variant_dir, sample_results())
    result = VariantResult("no-dp", config, variant_dir, _history(2), {}, 1.0)
    plans = [SiloPlan(f"silo-{i}", 100, 25, 0.6, None, None, None) for i in range(3)]
    paths = write_report(run_dir, config, [result], plans)
    return paths, json.loads(paths["json"].read_text()), paths["markdown"].read_text()


def test_report_carries_fairness_drift_and_top_features(tmp_path: Path) -> None:
    paths, report, markdown = _write(tmp_path, with_trust=True)
    trust = report["variants"]["no-dp"]["trust"]
    assert trust == json.loads(json.dumps(sample_results().to_json()))
    assert "## Trust: fairness, drift and explanations (no-dp variant)" in markdown
    assert "| F | 410 | 0.810 | 0.860 | 0.700 | 0.120 | 0.300 |" in markdown
    assert "| M | 389 | 0.780 | — |" in markdown  # the AUC that could not be computed
    assert "Demographic parity difference: 0.030" in markdown
    assert "Equalized odds difference: 0.040" in markdown
    assert "1 of 2 features above the PSI threshold 0.2 (alerts: `age`)" in markdown
    assert "| age | 0.3100 | 0.0500 | ALERT |" in markdown
    assert "**global model**" in markdown and "**student model**" in markdown
    assert "| 1 | b | 0.5000 | -0.4000 |" in markdown
    assert "ε = 0.5 at δ = 1e-06 per silo for this release" in markdown
    assert "the sum carries the noise of all 3 silos" in markdown
    for kind in ("fairness_plot", "attribution_plot", "drift_plot"):
        png = paths[f"no-dp_{kind}"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png.name})" in markdown


def test_report_without_trust_results_omits_the_sections(tmp_path: Path) -> None:
    paths, report, markdown = _write(tmp_path, with_trust=False)
    assert report["variants"]["no-dp"]["trust"] is None
    assert "Trust" not in markdown and "Fairness" not in markdown
    assert not any(name.endswith(("fairness_plot", "drift_plot")) for name in paths)
    assert not list((tmp_path / "run").glob("*fairness.png"))
