import subprocess
import sys

from conftest import ROOT


def test_mcts_imports_no_ml_library():
    code = (
        "import sys, mcts, mcts.types\n"
        "import importlib, pkgutil\n"
        "for m in pkgutil.iter_modules(mcts.__path__): importlib.import_module('mcts.' + m.name)\n"
        "bad = [m for m in ('torch', 'vllm', 'transformers', 'trl', 'numpy') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"mcts imported {out.stdout.strip()}"
