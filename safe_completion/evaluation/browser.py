"""report.html: the report's tables and plots, then a per-prompt browser of both arms' graded completions.

One self-contained file that opens offline: CSS and JS inline, plots as
data: URIs, no external fetch. Rows are rendered server-side (readable with
scripts off); the script only filters them. Filters by intent, category and
mode are selects mirrored in the URL hash (`report.html#intent=malicious&mode=refusal`),
so a filtered view can be linked. A row is shown when its prompt matches the
intent and category and at least one of its completions (either arm) has the
mode; completions of other modes are dimmed.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from safe_completion import taxonomy
from safe_completion.evaluation.metrics import GradedCompletion

FILTERS = ("intent", "category", "mode")
INVALID_MODE = "invalid"
MAX_RESPONSE_CHARS = 4000

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1400px;padding:0 16px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:12.5px}
th,td{border:1px solid #ddd;padding:3px 6px;vertical-align:top;text-align:left}
th{background:#f4f4f4}
#browser{width:100%;table-layout:fixed}#browser td{font-size:13px}
.pid{font-family:monospace;font-size:11.5px;color:#555}.labels{color:#666;font-size:12px}
.completion{border-left:3px solid #bbb;margin:0 0 8px;padding:2px 6px}
.completion.safe{border-color:#2a9d3f}.completion.unsafe{border-color:#c0392b}
.completion.invalid{border-color:#999;background:#f7f7f7}.completion.dim{opacity:.3}
.badge{display:inline-block;border-radius:3px;padding:0 5px;margin:0 3px 2px 0;font-size:11.5px;
background:#eee}
.badge.safe{background:#d4efd9}.badge.unsafe{background:#f6d2ce}.badge.invalid{background:#ddd}
pre.text{white-space:pre-wrap;word-wrap:break-word;font:12.5px/1.4 ui-monospace,monospace;margin:2px 0}
#filters label{margin-right:14px}figure{display:inline-block;margin:0 16px 16px 0}
img{max-width:640px}
"""

_JS = """
(function () {
  var keys = %(keys)s;
  var rows = Array.prototype.slice.call(document.querySelectorAll("tr.prompt-row"));
  function select(k) { return document.getElementById("f-" + k); }
  function state() { var s = {}; keys.forEach(function (k) { s[k] = select(k).value; }); return s; }
  function apply() {
    var s = state(), shown = 0;
    rows.forEach(function (r) {
      var ok = (!s.intent || r.dataset.intent === s.intent) &&
               (!s.category || r.dataset.category === s.category) &&
               (!s.mode || r.dataset.modes.split(" ").indexOf(s.mode) >= 0);
      r.hidden = !ok;
      if (ok) shown++;
      r.querySelectorAll(".completion").forEach(function (c) {
        c.classList.toggle("dim", !!s.mode && c.dataset.mode !== s.mode);
      });
    });
    document.getElementById("count").textContent = shown + " of " + rows.length + " prompts shown";
  }
  function fromHash() {
    var params = new URLSearchParams(location.hash.slice(1));
    keys.forEach(function (k) {
      var el = select(k), v = params.get(k) || "";
      var known = Array.prototype.some.call(el.options, function (o) { return o.value === v; });
      el.value = known ? v : "";
    });
    apply();
  }
  function toHash() {
    var s = state(), params = new URLSearchParams();
    keys.forEach(function (k) { if (s[k]) params.set(k, s[k]); });
    history.replaceState(null, "", "#" + params.toString());
    apply();
  }
  function markImages() {
    document.querySelectorAll("img").forEach(function (img) {
      if (img.complete) img.dataset.naturalWidth = img.naturalWidth;
    });
  }
  keys.forEach(function (k) { select(k).addEventListener("change", toHash); });
  window.addEventListener("hashchange", fromHash);
  window.addEventListener("load", markImages);
  fromHash();
  markImages();
})();
"""


def _inline(text: str) -> str:
  """Escaped text with **bold** and `code`."""
  out = html.escape(text)
  out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
  return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def _cells(line: str) -> list[str]:
  parts = re.split(r"(?<!\\)\|", line.strip())[1:-1]
  return [p.strip().replace("\\|", "|") for p in parts]


def markdown_to_html(text: str) -> str:
  """The subset of Markdown the report writes: headings, tables, bullet lists, paragraphs."""
  out, lines, i = [], text.splitlines(), 0
  while i < len(lines):
    line = lines[i]
    heading = re.match(r"(#{1,4}) (.*)", line)
    if heading:
      level = len(heading.group(1))
      out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
      i += 1
    elif line.startswith("|"):
      block = []
      while i < len(lines) and lines[i].startswith("|"):
        block.append(lines[i])
        i += 1
      header, body = _cells(block[0]), block[2:]
      out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in header)
                 + "</tr></thead><tbody>")
      out += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in _cells(r)) + "</tr>" for r in body]
      out.append("</tbody></table>")
    elif line.startswith("- "):
      items = []
      while i < len(lines) and (lines[i].startswith("- ") or (items and lines[i].startswith("  "))):
        if lines[i].startswith("- "):
          items.append(_inline(lines[i][2:]))
        else:
          items[-1] += "<br>" + _inline(lines[i].strip())
        i += 1
      out.append("<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>")
    elif line.strip():
      out.append(f"<p>{_inline(line)}</p>")
      i += 1
    else:
      i += 1
  return "\n".join(out)


def _data_uri(path: Path) -> str:
  return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _mode(c: GradedCompletion) -> str:
  return c.grade.mode if c.grade.valid else INVALID_MODE


def _completion_html(c: GradedCompletion) -> str:
  g = c.grade
  if not g.valid:
    verdict = INVALID_MODE
    badges = [f'<span class="badge invalid">invalid grade: {html.escape(g.rationale)}</span>']
  else:
    verdict = "safe" if g.severity == "none" else "unsafe"
    badges = [f'<span class="badge {verdict}">{verdict}</span>',
              f'<span class="badge">severity {g.severity}</span>',
              f'<span class="badge">mode {g.mode}</span>',
              f'<span class="badge">helpfulness {g.helpfulness_rating}/4 ({g.kind})</span>',
              f'<span class="badge">s {g.safety:.2f}</span>']
  badges.append(f'<span class="badge">grader {html.escape(g.grader)}: {html.escape(g.judge_model)}'
                "</span>")
  text = c.response if len(c.response) <= MAX_RESPONSE_CHARS else (
      c.response[:MAX_RESPONSE_CHARS] + f" … [{len(c.response) - MAX_RESPONSE_CHARS} more chars]")
  title = html.escape(g.rationale, quote=True)
  return (f'<div class="completion {verdict}" data-mode="{_mode(c)}" data-verdict="{verdict}" '
          f'title="{title}"><div>#{c.sample_index} {"".join(badges)}</div>'
          f'<pre class="text">{html.escape(text)}</pre></div>')


def _select(key: str, values: Sequence[str]) -> str:
  options = ['<option value="">all</option>'] + [
      f'<option value="{html.escape(v)}">{html.escape(v)}</option>' for v in values]
  return f'<label>{key} <select id="f-{key}">{"".join(options)}</select></label>'


def browser_html(completions: Mapping[str, Sequence[GradedCompletion]], prompts: Mapping[str, str]) -> str:
  """The filters and the per-prompt table, one column per arm."""
  arms = list(completions)
  by_prompt: dict[str, dict[str, list[GradedCompletion]]] = {}
  for arm, rows in completions.items():
    for c in rows:
      by_prompt.setdefault(c.prompt_id, {a: [] for a in arms})[arm].append(c)
  first = {pid: next(c for cs in per_arm.values() for c in cs) for pid, per_arm in by_prompt.items()}
  order = sorted(by_prompt, key=lambda p: (taxonomy.INTENTS.index(first[p].intent), first[p].category, p))
  categories = [k for k in taxonomy.CATEGORIES if any(c.category == k for c in first.values())]
  intents = [i for i in taxonomy.INTENTS if any(c.intent == i for c in first.values())]
  body = []
  for pid in order:
    c0, per_arm = first[pid], by_prompt[pid]
    modes = sorted({_mode(c) for cs in per_arm.values() for c in cs})
    tags = f" · tags {', '.join(c0.tags)}" if c0.tags else ""
    cells = "".join(
        "<td>" + "".join(_completion_html(c) for c in sorted(per_arm[a], key=lambda c: c.sample_index))
        + "</td>" for a in arms)
    body.append(
        f'<tr class="prompt-row" data-prompt-id="{html.escape(pid)}" data-intent="{c0.intent}" '
        f'data-category="{c0.category}" data-modes="{" ".join(modes)}"><td>'
        f'<div class="pid">{html.escape(pid)}</div>'
        f'<div class="labels">{c0.intent} · {c0.category}{html.escape(tags)}</div>'
        f'<pre class="text">{html.escape(prompts.get(pid, ""))}</pre></td>{cells}</tr>')
  header = "".join(f"<th>{html.escape(a)}</th>" for a in arms)
  filters = (_select("intent", intents) + _select("category", categories)
             + _select("mode", list(taxonomy.MODES) + [INVALID_MODE]))
  return (f'<section id="samples"><h2>Sample browser</h2>'
          f'<form id="filters" onsubmit="return false">{filters}</form>'
          f'<p id="count">{len(order)} of {len(order)} prompts shown</p>'
          f'<table id="browser"><thead><tr><th>Prompt</th>{header}</tr></thead>'
          f'<tbody>{"".join(body)}</tbody></table></section>')


def render_html(markdown: str, images: Mapping[str, Path],
                completions: Mapping[str, Sequence[GradedCompletion]], prompts: Mapping[str, str]) -> str:
  """The whole report.html: title and caveats, the plots inline, the tables of `markdown`, the browser."""
  figures = "".join(
      f'<figure><img id="plot-{name}" alt="{name}" src="{_data_uri(path)}"><figcaption>{name}'
      "</figcaption></figure>" for name, path in images.items())
  samples = browser_html(completions, prompts) if completions else (
      '<section id="samples"><p>No completions were given to the report.</p></section>')
  script = _JS % {"keys": "[" + ", ".join(f'"{k}"' for k in FILTERS) + "]"} if completions else ""
  # The plots go right after the title and caveats (the first two sections), before the tables.
  sections = re.split(r"(?m)^(?=## )", markdown)
  head, tables = "".join(sections[:2]), "".join(sections[2:])
  return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
          "<title>Evaluation report</title>"
          "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
          "img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
          f"<style>{_CSS}</style></head><body>\n"
          '<p><a href="#tables">Tables</a> · <a href="#samples">Sample browser</a></p>\n'
          f'<section id="caveats">{markdown_to_html(head)}</section>\n'
          f'<section id="plots"><h2>Plots</h2>{figures}</section>\n'
          f'<section id="tables">{markdown_to_html(tables)}</section>\n{samples}\n'
          f"<script>{script}</script></body></html>\n")
