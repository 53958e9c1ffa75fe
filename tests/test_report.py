"""The report card: reset, sections, the summary table, time and cost, and the plots."""

import re
import sys

from nanochat.report import Report, section_values


def fill(report):
    report.log("Base model training", [{"steps": 10, "min_val_bpb": 1.5}])
    report.log_curves("Base model training", {"train/loss": [[1, 5.0], [2, 4.0], [3, 3.5]], "val/bpb": [[0, 3.0], [3, 2.0]]})
    report.log("Base model evaluation", [{"source": "base"}, {"CORE": 0.1234}])
    for stage, acc in (("mid", 0.3), ("sft", 0.4)):
        report.log(f"Chat evaluation {stage}", [{"source": stage}, {"ARC-Easy": acc, "GSM8K": acc / 10, "ChatCORE": acc - 0.25}])


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR width, height


def test_generate_assembles_summary_sections_and_plots(tmp_path):
    report = Report(str(tmp_path / "report"))
    report.log("Stale section", [{"x": 1}])
    report.reset()
    assert not (tmp_path / "report" / "stale-section.md").exists()
    fill(report)
    text = open(report.generate(gpu_price=2.0)).read()
    header = text.split("## Summary")[0]
    assert re.search(r"git commit: [0-9a-f]{4,}", header) and "cores" in header and "lines" in header

    rows = dict(re.findall(r"^\| (\S+) \| (.*) \|$", text, re.M))
    assert rows["metric"].split(" | ") == ["BASE", "MID", "SFT"]
    assert rows["CORE"].split(" | ") == ["0.1234", "-", "-"]
    assert rows["ARC-Easy"].split(" | ") == ["-", "0.3000", "0.4000"]
    assert rows["ChatCORE"].split(" | ") == ["-", "0.0500", "0.1500"]
    assert "total wall time" in text and "estimated cost" in text
    # Sections in pipeline order, each once
    order = [m for m in re.findall(r"^## (.*)$", text, re.M) if m in ("Base model training", "Base model evaluation", "Chat evaluation mid")]
    assert order == ["Base model training", "Base model evaluation", "Chat evaluation mid"]
    for name in ("base-model-training.png", "metrics.png"):
        assert f"]({name})" in text
        width, height = png_size(tmp_path / "report" / name)
        assert width > 200 and height > 100


def test_without_matplotlib_the_plots_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = Report(str(tmp_path / "report"))
    report.reset()
    fill(report)
    text = open(report.generate()).read()
    assert "Plots skipped: matplotlib is not installed" in text and "CORE" in text
    assert not list((tmp_path / "report").glob("*.png"))


def test_section_values_parse_numbers():
    assert section_values("## X\n- a: 1.5\n- b: text\n- c: 3\n") == {"a": 1.5, "b": "text", "c": 3.0}
