"""The files `distrec evaluate` writes: metrics.json, report.md, report.html and the PNG plots.

report.md is plain Markdown beside its PNGs; report.html is the same Markdown rendered by
markdown-it-py (CommonMark + tables, raw HTML off, so a path cannot inject markup), with
the plots embedded as data URIs so the page is one file, a header saying which run, data,
recommendations and policy it describes, and a little CSS. Check it in a browser:

    chromium --headless --no-sandbox --disable-gpu --screenshot=/tmp/report.png \
        --window-size=1200,2400 file://$PWD/out/demo/eval/report.html
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from distrec import __version__
from distrec.atomic import savefig_atomic, write_atomic

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d232a; margin: 0;
       background: #f6f7f9; }
main { max-width: 980px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; min-height: 100vh; }
h1 { font-size: 1.5em; margin: 0 0 .4em; word-break: break-all; }
h2 { font-size: 1.15em; margin: 1.8em 0 .6em; padding-bottom: .2em; border-bottom: 1px solid #e3e6ea; }
table { border-collapse: collapse; margin: .6em 0 1em; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 12px; border: 1px solid #dde1e6; text-align: left; }
th { background: #eef1f4; font-weight: 600; }
tbody tr:nth-child(even) { background: #f8f9fb; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, monospace; background: #f1f3f5; padding: 1px 4px;
       border-radius: 3px; word-break: break-all; }
ul { padding-left: 1.2em; }
blockquote { margin: 1em 0; padding: .5em 1em; background: #fff7e0; border-left: 4px solid #e0a800; }
blockquote p { margin: .2em 0; }
img { max-width: 100%; height: auto; display: block; margin: .8em 0; border: 1px solid #e3e6ea; }
"""

REPORT_FILES = ("metrics.json", "report.md", "report.html", "exposure.png", "slices.png")
SWEEP_FILES = ("sweep.json", "tradeoff.png")


def number(value: float | None, users: int | None = None, digits: int = 4) -> str:
    """A metric for a table: 'n/a (0 users)' when it is undefined (no users), not 0.0000."""
    if value is None:
        return f"n/a ({users} users)" if users is not None else "n/a"
    return f"{value:.{digits}f}"


def code(text) -> str:
    """Text (a path, an id) as a Markdown code span that cannot break a table row."""
    return "`" + str(text).replace("`", "'").replace("|", "\\|") + "`"


def text(words: str) -> str:
    """Plain text in Markdown: punctuation that Markdown would read as markup, escaped."""
    return "".join("\\" + c if c in "\\`*_[]<>|#!" else c for c in str(words))


def main_k(metrics: dict) -> int:
    """The cut-off the report leads with: 10, or the largest one measured (short lists)."""
    ks = sorted(int(m.split("@")[1]) for m in metrics if m.startswith("ndcg@"))
    return 10 if 10 in ks else ks[-1]


def _header(result: dict) -> list[str]:
    about = result.get("about", {})
    policy = about.get("policy")
    if isinstance(policy, dict):
        policy = f"{policy.get('name')}" + (f", strength {policy.get('strength')}" if policy.get("name") != "none" else "")
    lines = [f"- recommendations: {code(about.get('recs', '?'))}"
             + (f" (scoring job {code(about['job'])}, {about.get('parts')} part(s))" if about.get("job") else ""),
             f"- policy: {code(policy) if policy else 'not recorded'}",
             f"- data: {code(about.get('data', '?'))}",
             f"- run: {code(about['run']) if about.get('run') else 'not given (no item-vector ILD)'}"]
    if about.get("scored_with_run") and about.get("scored_with_run") != about.get("run"):
        lines.append(f"- lists scored with the run {code(about['scored_with_run'])}")
    return lines + [f"- distrec {__version__}", ""]


def _sweep_section(sweep: dict | None, image) -> list[str]:
    """The trade-off table and plot, when a sweep was written into the same directory."""
    if not sweep:
        return []
    k, loss = sweep["k"], sweep["max_loss"]
    lines = ["## Accuracy-diversity trade-off", "",
             f"NDCG@{k} without re-ranking: {sweep['reference_ndcg']:.4f}. Most diverse setting of each "
             f"policy while NDCG@{k} stays within {loss:.0%}"
             + (f" (sweep of the run {code(sweep['run'])})" if sweep.get("run") else "") + ":", "",
             f"| policy | strength (ILD) | NDCG@{k} | ILD@{k} | strength (coverage) | category coverage@{k} |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, best in sweep["best_within_loss"].items():
        a, b = best["ild"], best["category_coverage"]
        lines.append(f"| {name} | {a['strength']} | {a[f'ndcg@{k}']:.4f} | {a[f'ild@{k}']:.3f} | {b['strength']} | "
                     f"{b[f'category_coverage@{k}']:.3f} |")
    return lines + ["", image("tradeoff.png"), ""]


def markdown(result: dict, title: str, images: list[str], sweep: dict | None, image=None) -> str:
    """The report as Markdown; `image(name)` writes an image's Markdown (default: a relative link)."""
    image = image or (lambda name: f"![{name[:-4]}]({name})")
    key = next(k for k in result if k.startswith("beyond@"))
    acc, interval = result["accuracy"], result.get("accuracy_interval", {})
    k = main_k(acc)
    lines = [f"# {text(title)}", "", *_header(result)]
    if result.get("warnings"):
        for warning in result["warnings"]:
            lines += [f"> **warning:** {text(warning)}", ""]
    lines += [f"{result['users']:,} test users, {result['users_with_lists']:,} with a list of up to "
              f"{result['list_length']} items.", "", "## Accuracy (full ranking)", "",
              "| metric | value | 95% interval |", "|---|---:|---:|",
              *[f"| {m} | {number(v, acc['users'])} | "
                f"{'± ' + number(interval[m]) if interval.get(m) is not None else 'n/a'} |"
                for m, v in acc.items() if m != "users"], "",
              f"## Beyond accuracy ({key.split('@')[1]} items)", "", "| metric | value |", "|---|---:|",
              *[f"| {m} | {number(v)} |" for m, v in result[key].items()], "", "## Slices", "",
              f"| slice | users | NDCG@{k} | HR@{k} |", "|---|---:|---:|---:|",
              *[f"| {s} | {m['users']:,} | {number(m.get(f'ndcg@{k}'), m['users'])} | "
                f"{number(m.get(f'hr@{k}'), m['users'])} |" for s, m in result["slices"].items()], "",
              *_stages_section(result), *[image(i) for i in images], "", *_sweep_section(sweep, image)]
    return "\n".join(lines) + "\n"


def _stages_section(result: dict) -> list[str]:
    """The retrieval ceiling under a ranker, and the paired comparison with another folder."""
    lines = []
    r = result.get("retrieval")
    if r:
        depth = r["candidates"]
        lines += ["## Retrieval stage (the ranker re-scored these candidates)", "",
                  f"recall@{depth} of the retrieval candidates: {number(r[f'recall@{depth}'])} over {r['users']:,} "
                  f"users (cold targets: {number(r.get(f'recall@{depth}_cold_targets'))}); a target outside them is "
                  "a miss whatever the ranker does.", ""]
    c = result.get("compare")
    if c:
        lines += [f"## Against {code(c['against'])} (same users, paired bootstrap)", "",
                  "| metric | these lists | the other | difference | 95% interval |", "|---|---:|---:|---:|---:|",
                  *[f"| {m} | {number(v['this'])} | {number(v['other'])} | {v['difference']:+.4f} | "
                    f"[{v['interval95'][0]:+.4f}, {v['interval95'][1]:+.4f}] |"
                    for m, v in c.items() if isinstance(v, dict)], ""]
    return lines


def html_page(markdown_text: str, title: str) -> str:
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown_text)
    return (f"<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n{body}</main>\n"
            "</body>\n</html>\n")


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def write_report(result: dict, out: Path, title: str, sweep: dict | None = None) -> None:
    """metrics.json (the result less the exposure counts), the plots, report.md and report.html."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "metrics.json", json.dumps({k: v for k, v in result.items() if k != "exposure"}, indent=2))
    images = plots(result, out)
    write_atomic(out / "report.md", markdown(result, title, images, sweep))
    embedded = markdown(result, title, images, sweep, image=lambda name: f"![{name[:-4]}]({_data_uri(out / name)})")
    write_atomic(out / "report.html", html_page(embedded, title))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plots(result: dict, out: Path) -> list[str]:
    """exposure.png (Lorenz curve) when anything was shown, and slices.png; their names."""
    plt = _pyplot()
    names = []
    exposure = np.sort(np.asarray(result["exposure"], dtype=float))
    if exposure.sum() > 0:
        fig, axis = plt.subplots(figsize=(5, 4))
        share = np.concatenate([[0], np.cumsum(exposure) / exposure.sum()])
        axis.plot(np.linspace(0, 1, len(share)), share, label="lists")
        axis.plot([0, 1], [0, 1], "--", color="gray", label="equal exposure")
        axis.set_xlabel("share of catalog (least shown first)")
        axis.set_ylabel("share of exposure")
        key = next(k for k in result if k.startswith("beyond@"))
        axis.set_title(f"exposure Lorenz curve, Gini {result[key]['gini']:.3f}")
        axis.legend()
        fig.tight_layout()
        savefig_atomic(fig, out / "exposure.png", dpi=110)
        plt.close(fig)
        names.append("exposure.png")
    slices = result["slices"]
    k = main_k(result["accuracy"])
    fig, axis = plt.subplots(figsize=(7, 4))
    labels = list(slices)
    values = [slices[s].get(f"ndcg@{k}") for s in labels]
    axis.bar(range(len(labels)), [v or 0.0 for v in values])
    for x, v in enumerate(values):
        if v is None:  # no users in the slice: no bar, and said so
            axis.text(x, 0, "n/a", ha="center", va="bottom", fontsize=8, color="gray")
    axis.set_xticks(range(len(labels)), [f"{s}\n({slices[s]['users']})" for s in labels], fontsize=7)
    axis.set_ylabel(f"NDCG@{k}")
    axis.set_title("accuracy by slice (users)")
    fig.tight_layout()
    savefig_atomic(fig, out / "slices.png", dpi=110)
    plt.close(fig)
    return names + ["slices.png"]


def plot_sweep(result: dict, out: Path) -> None:
    """tradeoff.png: NDCG@k against ILD and category coverage for every policy's strengths."""
    plt = _pyplot()
    k = result["k"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, metric, label in ((axes[0], f"ild@{k}", f"ILD@{k} (1 - mean cosine)"),
                                (axes[1], f"category_coverage@{k}", f"category coverage@{k}")):
        for name in sorted({p["policy"] for p in result["points"]} - {"none"}):
            pts = [p for p in result["points"] if p["policy"] == name]
            axis.plot([p[metric] for p in pts], [p[f"ndcg@{k}"] for p in pts], "o-", label=name)
            best = result["best_within_loss"].get(name, {}).get("ild" if "ild" in metric else "category_coverage")
            if best:
                axis.plot(best[metric], best[f"ndcg@{k}"], "*", markersize=14, color="black")
        none = result["points"][0]
        axis.plot(none[metric], none[f"ndcg@{k}"], "s", color="gray", label="none")
        axis.axhline((1 - result["max_loss"]) * result["reference_ndcg"], ls="--", color="gray", lw=0.8)
        axis.set_xlabel(label)
        axis.set_ylabel(f"NDCG@{k}")
        axis.legend(fontsize=8)
    axes[0].set_title(f"trade-off (stars: most diverse within {result['max_loss']:.0%} NDCG loss)", fontsize=9)
    fig.tight_layout()
    savefig_atomic(fig, out / "tradeoff.png", dpi=110)
    plt.close(fig)
