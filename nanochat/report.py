"""
The report card. Each stage logs a section with `get_report().log(section=..., data=[...])`;
sections are markdown files under $NANOCHAT_BASE_DIR/report/, assembled by a later `generate`.
"""

import datetime
import os
import re

from nanochat.common import get_base_dir, get_rank


class Report:
    def __init__(self, folder):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    def log(self, section, data):
        """Write one section: `data` is a list of dicts (key: value lines) and strings (verbatim)."""
        slug = re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")
        lines = [f"## {section}", f"timestamp: {datetime.datetime.now():%Y-%m-%d %H:%M:%S}", ""]
        for item in data:
            if isinstance(item, dict):
                lines += [f"- {k}: {v:.6g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in item.items()]
            else:
                lines.append(str(item))
        path = os.path.join(self.folder, f"{slug}.md")
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
        return path


class DummyReport:
    """What ranks other than 0 get: logging does nothing."""

    def log(self, *args, **kwargs):
        return None


def get_report():
    return Report(os.path.join(get_base_dir(), "report")) if get_rank() == 0 else DummyReport()
