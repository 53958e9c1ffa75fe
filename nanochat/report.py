"""
The report card. Each stage logs a section with `get_report().log(section=..., data=[...])` (and
its loss curves with `log_curves`); sections are markdown files under $NANOCHAT_BASE_DIR/report/.

    python -m nanochat.report reset      # start a run: clear old sections, write the header
    python -m nanochat.report generate   # assemble report.md: header, summary table, sections, plots

`generate` adds a summary of the metrics by stage, the wall time since `reset`, a cost estimate
(GPU hourly price x GPUs x hours; `--gpu_price` overrides the table below) and, when matplotlib is
installed, PNG plots of every stage's loss curves and of the summary table.
"""

import datetime
import glob
import json
import os
import platform
import re
import subprocess
import sys

from nanochat.common import get_base_dir, get_rank, make_parser

# Stages in pipeline order: (report section, column of the summary table, metrics it shows)
STAGES = [
    ("Base model evaluation", "BASE", ["CORE"]),
    ("Chat evaluation mid", "MID", ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"]),
    ("Chat evaluation sft", "SFT", ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"]),
    ("Chat evaluation rl", "RL", ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"]),
]
SECTION_ORDER = ["Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model loss",
                 "Base model evaluation", "Midtraining", "Chat evaluation mid", "Chat SFT", "Chat evaluation sft",
                 "Chat RL", "Chat evaluation rl"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # for git and the code size
GPU_PRICE_PER_HOUR = {"H200": 3.5, "H100": 3.0, "A100": 1.8, "L40S": 1.0, "A10": 0.75, "L4": 0.7}  # on-demand, USD, rough


def slugify(section):
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")


def _write(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


class Report:
    def __init__(self, folder):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    def log(self, section, data):
        """Write one section: `data` is a list of dicts (key: value lines) and strings (verbatim)."""
        lines = [f"## {section}", f"timestamp: {datetime.datetime.now():%Y-%m-%d %H:%M:%S}", ""]
        for item in data:
            if isinstance(item, dict):
                lines += [f"- {k}: {v:.6g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in item.items()]
            else:
                lines.append(str(item))
        path = os.path.join(self.folder, f"{slugify(section)}.md")
        _write(path, "\n".join(lines) + "\n")
        return path

    def log_curves(self, section, curves):
        """Save a stage's curves, {name: [[step, value], ...]}, for the plots."""
        _write(os.path.join(self.folder, f"{slugify(section)}.curves.json"), json.dumps(curves))

    def reset(self):
        """Remove the sections of an earlier run and write this run's header."""
        for path in glob.glob(os.path.join(self.folder, "*")):
            if os.path.isfile(path):
                os.remove(path)
        _write(os.path.join(self.folder, "header.md"), header())
        _write(os.path.join(self.folder, "start_time"), datetime.datetime.now().isoformat())

    def generate(self, gpu_price=None):
        """Assemble report.md (and the plots); returns its path."""
        sections = {}
        for path in glob.glob(os.path.join(self.folder, "*.md")):
            name = os.path.basename(path)
            if name not in ("header.md", "report.md"):
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                sections[text.splitlines()[0].removeprefix("## ").strip()] = text
        table = summary_table(sections)
        order = [s for s in SECTION_ORDER if s in sections] + sorted(s for s in sections if s not in SECTION_ORDER)
        header_path = os.path.join(self.folder, "header.md")
        parts = [open(header_path, encoding="utf-8").read() if os.path.exists(header_path) else "# nanochat report\n"]
        parts += [markdown_table(table), wall_time_and_cost(self.folder, gpu_price), self.plots(table)]
        parts += [sections[s] for s in order]
        path = os.path.join(self.folder, "report.md")
        _write(path, "\n\n".join(p.strip() for p in parts if p) + "\n")
        return path

    def plots(self, table):
        """PNG plots beside report.md, as markdown that shows them (or why there are none)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return "## Plots\n\nPlots skipped: matplotlib is not installed (`pip install matplotlib`)."
        lines = ["## Plots", ""]
        for path in sorted(glob.glob(os.path.join(self.folder, "*.curves.json"))):
            with open(path) as f:
                curves = json.load(f)
            stage = os.path.basename(path).removesuffix(".curves.json")
            fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
            for ax, (name, points) in zip(axes[0], curves.items()):
                if points:
                    ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
                ax.set_title(f"{stage}: {name}")
                ax.set_xlabel("step")
                ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(os.path.join(self.folder, f"{stage}.png"), dpi=100)
            plt.close(fig)
            lines.append(f"![{stage}]({stage}.png)")
        metrics = [(m, stage, v) for stage, row in table.items() for m, v in row.items() if v is not None]
        if metrics:
            names = sorted({m for m, _, _ in metrics}, key=lambda m: [m2 for _, _, ms in STAGES for m2 in ms].index(m))
            fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 3.5))
            stages = list(table)
            width = 0.8 / max(1, len(stages))
            for k, stage in enumerate(stages):
                values = [table[stage].get(m) or 0 for m in names]
                ax.bar([i + k * width for i in range(len(names))], values, width, label=stage)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=30, ha="right")
            ax.legend()
            ax.set_title("metrics by stage")
            fig.tight_layout()
            fig.savefig(os.path.join(self.folder, "metrics.png"), dpi=100)
            plt.close(fig)
            lines.append("![metrics](metrics.png)")
        return "\n".join(lines)


class DummyReport:
    """What ranks other than 0 get: logging does nothing."""

    def log(self, *args, **kwargs):
        return None

    def log_curves(self, *args, **kwargs):
        return None


def get_report():
    return Report(os.path.join(get_base_dir(), "report")) if get_rank() == 0 else DummyReport()


# ---- the pieces of report.md ----


def _git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=REPO).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def header():
    import torch

    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = " (with uncommitted changes)" if _git("status", "--porcelain") else ""
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    memory = ""
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        memory = f"{kib / 2**20:.1f} GiB"
    files = [f for f in _git("ls-files").splitlines() if f.endswith((".py", ".rs", ".sh", ".html", ".toml"))]
    lines = chars = 0
    for f in files:
        try:
            with open(os.path.join(REPO, f), encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError):
            continue
        lines, chars = lines + text.count("\n"), chars + len(text)
    return "\n".join([
        "# nanochat report", "",
        f"- date: {datetime.datetime.now():%Y-%m-%d %H:%M:%S}",
        f"- git commit: {commit}{dirty}",
        f"- CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        f"- GPUs: {len(gpus)} x {gpus[0]}" if gpus else "- GPUs: none",
        f"- memory: {memory or 'unknown'}",
        f"- software: Python {platform.python_version()}, torch {torch.__version__}, {platform.system()} {platform.release()}",
        f"- code: {len(files)} files, {lines:,} lines, {chars:,} characters (Python, Rust, shell, HTML, TOML)",
    ]) + "\n"


def section_values(text):
    """The `- key: value` lines of a section, numbers parsed."""
    values = {}
    for key, value in re.findall(r"^- ([^:]+): (.*)$", text, re.M):
        try:
            values[key.strip()] = float(value)
        except ValueError:
            values[key.strip()] = value.strip()
    return values


def summary_table(sections):
    """{stage column: {metric: value}} for the stages that ran."""
    table = {}
    for section, column, metrics in STAGES:
        if section in sections:
            values = section_values(sections[section])
            table[column] = {m: values.get(m) if isinstance(values.get(m), float) else None for m in metrics}
    return table


def markdown_table(table):
    if not table:
        return "## Summary\n\nNo evaluation sections yet."
    metrics = [m for _, _, ms in STAGES for m in ms]
    metrics = list(dict.fromkeys(m for m in metrics if any(m in row for row in table.values())))
    lines = ["## Summary", "", "| metric | " + " | ".join(table) + " |", "|---" * (len(table) + 1) + "|"]
    for m in metrics:
        cells = [f"{row[m]:.4f}" if row.get(m) is not None else "-" for row in table.values()]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def wall_time_and_cost(folder, gpu_price):
    path = os.path.join(folder, "start_time")
    if not os.path.exists(path):
        return "## Time and cost\n\nNo start time: run `python -m nanochat.report reset` at the start of a run."
    with open(path) as f:
        hours = (datetime.datetime.now() - datetime.datetime.fromisoformat(f.read().strip())).total_seconds() / 3600
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpu_price is None and gpus:
        name = torch.cuda.get_device_name(0)
        gpu_price = next((p for key, p in GPU_PRICE_PER_HOUR.items() if key in name), None)
    if gpus and gpu_price:
        cost = f"${gpus * gpu_price * hours:,.2f} ({gpus} GPUs x ${gpu_price:.2f}/h x {hours:.2f} h)"
    else:
        cost = "n/a (no GPU, or unknown price: pass --gpu_price)"
    return f"## Time and cost\n\n- total wall time: {hours * 60:.1f} min\n- estimated cost: {cost}"


parser = make_parser(description="The report card of a run.")
parser.add_argument("command", choices=["reset", "generate"], help="reset: start a new report; generate: write report.md")
parser.add_argument("--gpu_price", type=float, default=None, help="USD per GPU-hour for the cost estimate")


def main():
    args = parser.parse_args()
    report = Report(os.path.join(get_base_dir(), "report"))
    if args.command == "reset":
        report.reset()
        print(f"report reset: {report.folder}")
    else:
        print(f"report written to {report.generate(args.gpu_price)}")


if __name__ == "__main__":
    sys.exit(main())
