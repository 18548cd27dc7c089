"""Reports a radiologist can read: ``report.md`` and a self-contained ``report.html``.

A report is a list of sections (title, paragraphs, optional tables, figures). The HTML embeds every
figure as a base64 data URI, so the single file can be mailed or opened offline.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from spinediff.io import write_text


def fmt(value, digits: int = 3) -> str:
    """A number for a report table; '–' for None, NaN and infinity."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[Path, str]] = field(default_factory=list)  # (png, caption)


def csv_text(rows: list[dict]) -> str:
    """Rows of one table as CSV text (columns: the first row's keys)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def schedule_cell(entry: dict | None) -> str:
    """``steps / final learning rate`` of one fold's timing record, for the schedule tables ('-': not trained)."""
    entry = entry or {}
    steps, lr = entry.get("steps"), entry.get("final_learning_rate")
    return "-" if steps is None else f"{steps} / {lr:.2g}" if lr is not None else f"{steps} / ?"


def _markdown(title: str, sections: list[Section], folder: Path) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for paragraph in section.paragraphs:
            lines += [paragraph, ""]
        for table in section.tables:
            lines.append("| " + " | ".join(table.header) + " |")
            lines.append("|" + "---|" * len(table.header))
            lines += ["| " + " | ".join(row) + " |" for row in table.rows]
            lines += ["", f"*{table.caption}*" if table.caption else "", ""]
        for path, caption in section.figures:
            relative = os.path.relpath(path, folder)
            lines += [f"![{caption}]({relative})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def _html(title: str, sections: list[Section]) -> str:
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}"
        "th{background:#eee}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%;height:auto;border:1px solid #ddd}"
        "figure{margin:1.2em 0}figcaption,.caption{color:#555;font-size:0.9em}h2{border-bottom:1px solid #ccc}"
        "</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts += [f"<p>{html.escape(p)}</p>" for p in section.paragraphs]
        for table in section.tables:
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in table.header) + "</tr>")
            for row in table.rows:
                parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
            parts.append("</table>")
            if table.caption:
                parts.append(f"<p class='caption'>{html.escape(table.caption)}</p>")
        for path, caption in section.figures:
            raw = Path(path).read_bytes()
            width = int.from_bytes(raw[16:20], "big") if raw[:8] == b"\x89PNG\r\n\x1a\n" else 800
            data = base64.b64encode(raw).decode("ascii")
            # Natural size, never upscaled: small plots stay small, wide panels shrink to the page.
            parts.append(f"<figure><img alt='{html.escape(caption)}' style='width:{width}px' "
                         f"src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(title: str, sections: list[Section], folder: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``report.md`` (figures linked) and ``report.html`` (figures embedded) into ``folder``."""
    folder = Path(folder)
    sections = [Section(s.title, s.paragraphs, s.tables, [(Path(p), c) for p, c in s.figures if Path(p).is_file()])
                for s in sections]
    md, page = folder / "report.md", folder / "report.html"
    write_text(_markdown(title, sections, folder), md)
    write_text(_html(title, sections), page)
    return md, page


def _chromium(arguments: list[str], page: str | os.PathLike, timeout: float) -> str:
    """Run headless Chromium (Debian's ``chromium``) on ``page``; returns its standard output."""
    import shutil
    import subprocess
    import tempfile

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                               "--no-first-run", "--disable-background-networking", "--disable-component-update",
                               "--disable-sync", f"--user-data-dir={profile}", *arguments,
                               Path(page).resolve().as_uri()],
                              check=True, capture_output=True, timeout=timeout, text=True)
    return done.stdout


def screenshot(page: str | os.PathLike, target: str | os.PathLike, width: int = 1200, height: int = 4000,
               timeout: float = 120.0) -> Path:
    """Render ``page`` with headless Chromium to a PNG; raises if Chromium is missing."""
    target = Path(target).resolve()
    _chromium([f"--window-size={width},{height}", f"--screenshot={target}"], page, timeout)
    return target


LOAD_PROBE = ("<script>window.addEventListener('load',function(){var all=Array.prototype.slice.call(document.images);"
              "var ok=all.filter(function(i){return i.complete&&i.naturalWidth>0;});"
              "document.title='IMAGES '+ok.length+'/'+all.length;});</script>")


def loaded_images(page: str | os.PathLike, timeout: float = 120.0) -> tuple[int, int]:
    """(images Chromium decoded, images on the page) after loading a copy of ``page`` in headless Chromium."""
    import re
    import tempfile

    text = Path(page).read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder) / "probe.html"
        probe.write_text(text.replace("</body>", LOAD_PROBE + "</body>"), encoding="utf-8")
        dom = _chromium(["--dump-dom", "--virtual-time-budget=20000"], probe, timeout)
    found = re.search(r"<title>IMAGES (\d+)/(\d+)</title>", dom)
    if found is None:
        raise RuntimeError(f"Chromium did not finish loading {page} (no image count in its DOM)")
    return int(found.group(1)), int(found.group(2))
