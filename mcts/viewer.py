"""A self-contained HTML viewer for search trees.

    python -m mcts.viewer runs/x/round_0/trees.jsonl [-o trees.html]

writes one HTML page (inline CSS and JS, nothing fetched): a list of the trees (problem id, question,
gold answer, whether a correct terminal was found) and, for the selected tree, a foldable tree of
steps showing text, Q, visits, self-evaluation, prior and outcome, coloured by Q (red -1 .. green +1);
terminals are marked ✓ (outcome +1) or ✗ (outcome -1) with their extracted answer. A step that ran
programs (tool-integrated steps) shows its rationale, then each program and its output in boxes of
their own (the output's box is red when the program failed), from the node's `tool_calls`.

The trees are embedded as compact JSON and rendered on click, so pages with thousands of trees open
quickly; the first tree is also rendered server-side (readable without JavaScript). All text is
escaped (html.escape server-side, textContent in the browser).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
from pathlib import Path
from typing import Iterable

from mcts.tree import ROOT, Tree, iter_trees

log = logging.getLogger(__name__)

CORRECT_MARK = "✓"
WRONG_MARK = "✗"
OPEN_DEPTH = 3
"""Nodes shallower than this start unfolded."""

NODE_KEYS = ("id", "parent", "depth", "text", "visits", "q", "self_eval", "prior", "outcome", "terminal", "answer",
             "segments")
"""The columns of a node row in the embedded JSON (`segments`: a tool step's text as [kind, text, ok] pieces)."""
# tools/format.py's fences, repeated because mcts imports nothing of the other packages
# (tests/test_tool_use.py checks that they agree).
CODE_OPEN, OUTPUT_OPEN, FENCE = "```python", "```output", "```"
TEXT, CODE, OUTPUT = "text", "code", "output"

CSS = """
body{font-family:system-ui,sans-serif;margin:0;display:flex;height:100vh}
#list{width:32%;overflow:auto;border-right:1px solid #ccc}
#view{flex:1;overflow:auto;padding:0 1em}
table{border-collapse:collapse;width:100%;font-size:13px}
td,th{padding:3px 6px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
tr.row{cursor:pointer} tr.row:hover{background:#f3f3ff} tr.sel{background:#e0e0ff}
details{margin-left:1.2em} summary{cursor:pointer;margin:2px 0}
.step{white-space:pre-wrap;font-family:ui-monospace,monospace;padding:1px 4px;border-radius:3px}
.stats{color:#555;font-size:12px;margin-left:.5em}
.ok{color:#080;font-weight:bold} .bad{color:#c00;font-weight:bold}
.leaf{margin-left:1.2em;list-style:none}
.code,.out{font-family:ui-monospace,monospace;white-space:pre-wrap;margin:2px 0 2px 1.2em;
  padding:2px 6px;font-size:12px}
.code{background:#f4f4f4;border-left:3px solid #999} .out{background:#eef4ff;border-left:3px solid #36c}
.out.failed{background:#fff0f0;border-left-color:#c00}
.prose{white-space:pre-wrap;font-family:ui-monospace,monospace;margin:2px 0 2px 1.2em;font-size:12px}
""".strip()

JS = """
const DATA = JSON.parse(document.getElementById('trees-data').textContent);
const K = {}; DATA.keys.forEach((k, i) => K[k] = i);
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text; return e; }
function colour(q) { return 'hsl(' + Math.round((q + 1) / 2 * 120) + ',70%,85%)'; }
function fmt(x, d) { return x === null ? '-' : Number(x).toFixed(d); }
function line(n) {
  const s = el('span');
  if (n[K.outcome] !== null) s.appendChild(el('span', n[K.outcome] > 0 ? 'ok' : 'bad',
    n[K.outcome] > 0 ? '\\u2713 ' : '\\u2717 '));
  const segs = n[K.segments] || [];
  const text = n[K.depth] === 0 ? '(question)' :
    (segs.length ? (segs[0][0] === 'text' ? segs[0][1] : '(program)') : n[K.text]);
  const t = el('span', 'step', text); t.style.background = colour(n[K.q]); s.appendChild(t);
  let st = 'Q=' + fmt(n[K.q], 2) + ' N=' + n[K.visits] + ' s=' + fmt(n[K.self_eval], 2) + ' p=' + fmt(n[K.prior], 2);
  if (n[K.outcome] !== null) st += ' o=' + (n[K.outcome] > 0 ? '+1' : '-1');
  if (n[K.terminal]) st += ' answer=' + (n[K.answer] === null ? '-' : n[K.answer]);
  s.appendChild(el('span', 'stats', st));
  segs.forEach((g, i) => { if (i === 0 && g[0] === 'text') return;
    s.appendChild(el('div', g[0] === 'code' ? 'code' : (g[0] === 'output' ? (g[2] ? 'out' : 'out failed') : 'prose'),
      g[1])); });
  return s;
}
function build(nodes, kids, id) {
  const n = nodes[id];
  if (!kids[id].length) { const d = el('div', 'leaf'); d.appendChild(line(n)); return d; }
  const d = el('details'); if (n[K.depth] < DATA.open_depth) d.open = true;
  const s = el('summary'); s.appendChild(line(n)); d.appendChild(s);
  kids[id].forEach(c => d.appendChild(build(nodes, kids, c))); return d;
}
function show(i) {
  const t = DATA.trees[i], view = document.getElementById('view');
  view.replaceChildren();
  view.appendChild(el('h3', null, t.problem_id + ' (' + t.nodes.length + ' nodes)'));
  view.appendChild(el('p', 'step', t.question));
  view.appendChild(el('p', null, 'gold: ' + t.gold + '   solved: ' + (t.solved ? '\\u2713' : '\\u2717')));
  const kids = t.nodes.map(() => []);
  t.nodes.forEach(n => { if (n[K.parent] >= 0) kids[n[K.parent]].push(n[K.id]); });
  view.appendChild(build(t.nodes, kids, 0));
  document.querySelectorAll('tr.row').forEach(r => r.classList.toggle('sel', Number(r.dataset.i) === i));
}
document.querySelectorAll('tr.row').forEach(r => r.addEventListener('click', () => show(Number(r.dataset.i))));
""".strip()


def solved(tree: Tree) -> bool:
    """A correct terminal (outcome +1) was found."""
    return any(n.terminal and n.outcome is not None and n.outcome > 0 for n in tree.nodes)


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def compact(tree: Tree) -> dict:
    """The embedded form of a tree: problem fields and one row per node (NODE_KEYS order)."""
    rows = [[n.id, n.parent, n.depth, n.text, n.visits, _round(n.q), _round(n.self_eval), _round(n.prior),
             n.outcome, n.terminal, n.answer, segments(n)] for n in tree.nodes]
    return {"problem_id": tree.problem.id, "question": tree.problem.question, "gold": tree.problem.answer,
            "solved": solved(tree), "nodes": rows}


def segments(node) -> list[list]:
    """A tool step's text in order as [kind, text, ok] pieces: prose, each program's code, each output
    (ok: the matching tool call ran); [] for a step without tool calls (shown as its text)."""
    if not node.tool_calls:
        return []
    out: list[list] = []
    kind, lines, outputs = TEXT, [], 0

    def flush():
        nonlocal outputs
        body = "\n".join(lines).strip("\n")
        ok = True
        if kind == OUTPUT:
            ok = bool(node.tool_calls[outputs].get("ok")) if outputs < len(node.tool_calls) else False
            outputs += 1
        if body or kind != TEXT:
            out.append([kind, body, ok])
        lines.clear()

    for line in node.text.split("\n"):
        stripped = line.strip()
        if kind == TEXT and stripped.startswith((CODE_OPEN, OUTPUT_OPEN)):
            flush()
            kind = CODE if stripped.startswith(CODE_OPEN) else OUTPUT
        elif kind != TEXT and stripped == FENCE:
            flush()
            kind = TEXT
        else:
            lines.append(line)
    flush()
    return out


def step_text(node) -> str:
    """The text a node's line shows: a tool step's prose before its first program (the rest is shown in
    pieces below it), any other step's whole text."""
    pieces = segments(node)
    if not pieces:
        return node.text
    return pieces[0][1] if pieces[0][0] == TEXT else "(program)"


def q_colour(q: float) -> str:
    """Background colour for a Q in [-1, 1]: red (-1) through yellow to green (+1)."""
    return f"hsl({round((max(-1.0, min(1.0, q)) + 1) / 2 * 120)},70%,85%)"


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def node_line_html(tree: Tree, node_id: int) -> str:
    """One node's line (server-side twin of the JS `line`)."""
    n = tree.nodes[node_id]
    mark = ""
    if n.outcome is not None:
        mark = (f'<span class="ok">{CORRECT_MARK} </span>' if n.outcome > 0
                else f'<span class="bad">{WRONG_MARK} </span>')
    text = "(question)" if n.id == ROOT else html.escape(step_text(n))
    stats = f"Q={n.q:.2f} N={n.visits} s={_fmt(n.self_eval)} p={_fmt(n.prior)}"
    if n.outcome is not None:
        stats += " o=" + ("+1" if n.outcome > 0 else "-1")
    if n.terminal:
        stats += " answer=" + html.escape("-" if n.answer is None else n.answer)
    pieces = segments(n)
    classes = {CODE: "code", TEXT: "prose"}
    programs = "".join(f'<div class="{classes.get(kind, "out" if ok else "out failed")}">{html.escape(body)}</div>'
                       for i, (kind, body, ok) in enumerate(pieces) if not (i == 0 and kind == TEXT))
    return (f'<span>{mark}<span class="step" style="background:{q_colour(n.q)}">{text}</span>'
            f'<span class="stats">{stats}</span>{programs}</span>')


def tree_html(tree: Tree) -> str:
    """The foldable tree of one search tree (server-side twin of the JS `show`)."""
    def build(node_id: int) -> str:
        n = tree.nodes[node_id]
        if not n.children:
            return f'<div class="leaf">{node_line_html(tree, node_id)}</div>'
        inner = "".join(build(c) for c in n.children)
        opened = " open" if n.depth < OPEN_DEPTH else ""
        return f"<details{opened}><summary>{node_line_html(tree, node_id)}</summary>{inner}</details>"

    p = tree.problem
    return (f"<h3>{html.escape(p.id)} ({len(tree.nodes)} nodes)</h3>"
            f'<p class="step">{html.escape(p.question)}</p>'
            f"<p>gold: {html.escape(p.answer)}   solved: {CORRECT_MARK if solved(tree) else WRONG_MARK}</p>"
            + build(ROOT))


def _row(i: int, tree: Tree) -> str:
    p = tree.problem
    question = p.question if len(p.question) <= 160 else p.question[:157] + "..."
    mark = f'<span class="ok">{CORRECT_MARK}</span>' if solved(tree) else f'<span class="bad">{WRONG_MARK}</span>'
    return (f'<tr class="row" data-i="{i}"><td>{html.escape(p.id)}</td><td>{html.escape(question)}</td>'
            f"<td>{html.escape(p.answer)}</td><td>{mark}</td></tr>")


def _script_json(data: object) -> str:
    """JSON safe inside a <script> element (no '<', '>' or '&' can close it or start a comment)."""
    return (json.dumps(data, ensure_ascii=False, separators=(",", ":"))
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def render_html(trees: Iterable[Tree], *, title: str = "trees") -> str:
    """The whole page for `trees`."""
    trees = list(trees)
    rows = "".join(_row(i, t) for i, t in enumerate(trees))
    data = {"keys": list(NODE_KEYS), "open_depth": OPEN_DEPTH, "trees": [compact(t) for t in trees]}
    n_solved = sum(solved(t) for t in trees)
    first = tree_html(trees[0]) if trees else "<p>no trees</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{CSS}</style></head>
<body>
<div id="list"><p style="padding:0 6px">{len(trees)} trees, {n_solved} with a correct terminal ({CORRECT_MARK})</p>
<table><tr><th>id</th><th>question</th><th>gold</th><th>solved</th></tr>{rows}</table></div>
<div id="view">{first}</div>
<script type="application/json" id="trees-data">{_script_json(data)}</script>
<script>{JS}</script>
</body></html>
"""


def write_html(src: str | Path, out: str | Path | None = None) -> Path:
    """Render the trees file `src` to `out` (default: next to it, same name with .html)."""
    src = Path(src)
    out = Path(out) if out is not None else src.with_suffix(".html")
    out.write_text(render_html(iter_trees(src), title=str(src)), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mcts.viewer", description=__doc__.splitlines()[0])
    parser.add_argument("trees", help="a trees.jsonl file")
    parser.add_argument("-o", "--output", help="the HTML file to write (default: next to the input, .html)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = write_html(args.trees, args.output)
    print(out)


if __name__ == "__main__":
    main()
