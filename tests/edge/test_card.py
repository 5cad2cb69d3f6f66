"""The model card's trust section: fairness, drift, global and student top features."""

from __future__ import annotations

from pathlib import Path

from fedguard.edge.card import render_markdown, trust_section
from fedguard.edge.export import ExportResult
from fedguard.trust.results import TrustResults
from tests.trust.samples import sample_attributions, sample_results


def test_trust_section_merges_teacher_results_and_student_attributions(tmp_path: Path) -> None:
    teacher = sample_results()
    teacher_only_global = TrustResults(teacher.fairness, teacher.drift, teacher.attributions[:1])
    student = sample_attributions("student")
    section = trust_section(teacher_only_global, student, tmp_path)
    assert section is not None
    results = TrustResults.from_json(section["results"])
    assert [a.model for a in results.attributions] == ["global", "student"]
    assert results.fairness == teacher.fairness
    assert set(section["plots"]) == {"fairness_plot", "attribution_plot", "drift_plot"}
    for name in section["plots"].values():
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    # A student entry already in the teacher's results is replaced, not duplicated.
    again = trust_section(teacher, student, tmp_path)
    assert again is not None
    assert [a["model"] for a in again["results"]["attributions"]] == ["global", "student"]


def test_trust_section_is_absent_without_results(tmp_path: Path) -> None:
    assert trust_section(None, None, tmp_path) is None
    assert trust_section(TrustResults(), None, tmp_path) is None
    assert not list(tmp_path.iterdir())


def test_card_markdown_renders_the_trust_section(exported: ExportResult, tmp_path: Path) -> None:
    card = dict(exported.card)
    card.pop("trust", None)
    plain = render_markdown(card)
    assert "Trust" not in plain
    card["trust"] = trust_section(sample_results(), sample_attributions("student"), tmp_path)
    markdown = render_markdown(card)
    assert "## Trust: fairness, drift and explanations" in markdown
    assert "Fairness audit: sensitive attribute `sex`" in markdown
    assert "**student model**" in markdown and "**global model**" in markdown
    assert "(alerts: `age`)" in markdown
    assert "![attribution_plot](attributions.png)" in markdown
    # The section sits before the limitations, which stay last.
    assert markdown.index("## Trust") < markdown.index("## Known limitations")
