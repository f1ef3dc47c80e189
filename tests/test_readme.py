"""The README's quick-start example runs as printed."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quick_start_runs():
    text = README.read_text()
    blocks = re.findall(r"<!-- tests/test_readme.py executes this block -->\n```python\n(.*?)```", text, re.S)
    assert blocks, "README lost its executed quick-start block"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
