"""The README's quick-start example runs as printed, and its results tables are the committed
results CSVs (every published number has an artefact)."""

import re
from pathlib import Path

from nfpi import pretrained, repro

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quick_start_runs():
    text = README.read_text()
    marker = r"<!-- tests/test_readme.py executes this block -->\n```python\n(.*?)```"
    blocks = re.findall(marker, text, re.DOTALL)
    assert blocks, "README lost its executed quick-start block"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_readme_results_tables_agree_with_the_committed_artefacts():
    text = README.read_text()
    blocks = re.findall(r"<!-- results: (\S+)", text)
    assert blocks, "the README has no results table generated from a results CSV"
    for path in blocks:
        assert (README.parent / path).is_file(), f"README table without its artefact: {path}"
    assert repro.render_readme(text, README.parent) == text, (
        "a README results table differs from its CSV: run `python -m nfpi.repro README.md` after re-running "
        "the notebook, and commit both"
    )


def test_readme_shipped_flows_table_is_the_manifest():
    text = README.read_text()
    block = re.search(r"<!-- shipped: checkpoints/manifest.yaml -->\n(.*?)<!-- /shipped -->", text, re.DOTALL)
    assert block, "the README lost its table of shipped flows"
    rows = {
        m[0]: m[1:]
        for m in re.findall(
            r"^\| `([\w-]+)` \| [^|]+ \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", block[1], re.MULTILINE
        )
    }
    entries = pretrained.manifest()
    assert set(rows) == set(entries), "README table and checkpoints/manifest.yaml list other flows"
    for name, (images, top1, top5, bpd) in rows.items():
        e = entries[name]
        assert (int(images), top1, top5, bpd) == (
            e["test_images"],
            f"{e['acc_top1']:.2f}",
            f"{e['acc_top5']:.2f}",
            f"{e['test_bpd']:.4f}",
        ), name
