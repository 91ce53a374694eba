"""report.html is real HTML (tables, embedded plots, a header), and a browser draws it."""

import base64
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser

import pytest

from distrec import evaluate as ev
from tests.test_evaluate import _dataset, _fake_sweep, _scored


class Page(HTMLParser):
    """The tables (header cells, body rows), images, <pre> blocks and text of a page."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.pre, self.text, self.style = [], [], 0, [], ""
        self._cell, self._row, self._in_style = None, None, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append({"header": [], "rows": []})
        elif tag == "tr":
            self._row = []
        elif tag in ("th", "td"):
            self._cell = []
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "pre":
            self.pre += 1
        elif tag == "style":
            self._in_style = True

    def handle_endtag(self, tag):
        if tag in ("th", "td") and self._cell is not None:
            self._row.append(("th" if tag == "th" else "td", "".join(self._cell).strip()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            table = self.tables[-1]
            if all(kind == "th" for kind, _ in self._row):
                table["header"] = [c for _, c in self._row]
            else:
                table["rows"].append([c for _, c in self._row])
            self._row = None
        elif tag == "style":
            self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.style += data
        elif self._cell is not None:
            self._cell.append(data)
        self.text.append(data)


@pytest.fixture
def report(tmp_path):
    data = _dataset(tmp_path)
    recs = _scored(tmp_path, data)
    out = tmp_path / "eval"
    _fake_sweep(out, data)
    ev.evaluate(recs, data, out, keep_sweep=True)
    return out, recs, data


def test_report_html_has_tables_embedded_plots_and_a_header(report):
    out, recs, data = report
    page = Page()
    page.feed((out / "report.html").read_text())
    by_header = {tuple(t["header"]): t["rows"] for t in page.tables}
    accuracy = by_header[("metric", "value", "95% interval")]
    assert ["ndcg@2", "0.5436"] == accuracy[0][:2] and accuracy[0][2].startswith("± ")
    slices = {row[0]: row for row in by_header[("slice", "users", "NDCG@2", "HR@2")]}
    assert slices["cold_targets"][1] == "1" and slices["history_21-max"][2] == "n/a (0 users)"
    assert ("policy", "strength (ILD)", "NDCG@10", "ILD@10", "strength (coverage)", "category coverage@10") in by_header
    assert page.pre == 0 and "|---" not in "".join(page.text)  # no Markdown left over
    assert len(page.images) == 3  # exposure, slices, trade-off
    for image in page.images:
        assert image["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(image["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    text = " ".join(page.text)
    assert str(recs.resolve()) in text and str(data.resolve()) in text and "mmr, strength 0.3" in text
    assert "border-collapse" in page.style


def test_report_html_escapes_what_it_shows(tmp_path):
    """Paths and warnings are text, never markup (raw HTML is off in the renderer)."""
    data = _dataset(tmp_path)
    recs = _scored(tmp_path, data)
    odd = tmp_path / "<b>odd|name"
    recs.rename(odd)
    out = tmp_path / "eval"
    ev.evaluate(odd, data, out)
    page = (out / "report.html").read_text()
    assert "<b>odd" not in page and "&lt;b&gt;odd|name" in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_a_headless_browser_draws_the_report(report, tmp_path):
    import matplotlib.image

    out, _, _ = report
    shot = tmp_path / "report.png"
    profile = tempfile.mkdtemp(dir=tmp_path)
    done = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,2400",
                           (out / "report.html").as_uri()], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2400, 1200)
    drawn = (pixels[..., :3] < 0.9).any(axis=2).mean()  # text, table rules and plots, not a blank page
    assert drawn > 0.02, drawn
