"""The HTML viewer: question, escaped step text, ✓/✗ marks, embedded JSON that cannot break out."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys

from fakes import FakePolicy, sum_problem
from mcts.search import SearchConfig, run_search
from mcts.tree import ROOT, Tree, write_trees
from mcts.types import Problem
from mcts.viewer import main, render_html

from conftest import ROOT as REPO


def nasty_tree() -> Tree:
    tree = Tree(problem=Problem("p<1>", "What is <b>2</b> & 3?", "5"))
    a = tree.add_child(ROOT, text="</script><script>alert(1)</script>", visits=2, value_sum=1.0, self_eval=0.7)
    tree.add_child(a.id, text="The answer is 5", terminal=True, answer="5", outcome=1.0, visits=1, value_sum=1.0)
    tree.add_child(ROOT, text="The answer is <6>", terminal=True, answer="<6>", outcome=-1.0, visits=1,
                   value_sum=-1.0)
    tree.root.visits = 3
    return tree


def test_html_escapes_and_marks():
    page = render_html([nasty_tree()])
    assert "<script>alert(1)" not in page
    assert html.escape("</script><script>alert(1)</script>") in page
    assert html.escape("What is <b>2</b> & 3?") in page
    assert "✓" in page and "✗" in page
    assert "answer=&lt;6&gt;" in page
    # exactly our two script elements, and the embedded JSON parses back to the step text
    assert page.count("<script") == 2
    data = json.loads(re.search(r'id="trees-data">(.*?)</script>', page, re.S).group(1))
    assert data["trees"][0]["nodes"][1][data["keys"].index("text")] == "</script><script>alert(1)</script>"
    assert data["trees"][0]["solved"] is True
    assert "http://" not in page and "https://" not in page  # self-contained


def test_cli_writes_next_to_input(tmp_path):
    policy = FakePolicy()
    trees = list(run_search([sum_problem([2, 3, 4]), sum_problem([1, 1], pid="easy")], expander=policy,
                            evaluator=policy, verifier=policy, config=SearchConfig(simulations=8)))
    src = tmp_path / "trees.jsonl"
    write_trees(src, trees)
    main([str(src)])
    page = (tmp_path / "trees.html").read_text()
    assert "2+3+4" in page and "The answer is 9" in page and "✓" in page
    out = subprocess.run([sys.executable, "-m", "mcts.viewer", str(src), "-o", str(tmp_path / "x.html")],
                         cwd=REPO, capture_output=True, text=True, check=True)
    assert (tmp_path / "x.html").is_file() and "x.html" in out.stdout


def test_many_trees_render_quickly(tmp_path):
    tree = nasty_tree()
    page = render_html([tree] * 1000)
    assert page.count('class="row"') == 1000
    assert len(page) < 2_000_000
