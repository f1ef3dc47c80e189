"""``results/portability.csv`` (``scripts/portability.py measure``): the numbers the tests
recompute, measured on 12 emulated machines (ATen kernels default / AVX2 / native x oneDNN
native / AVX2 x 1 / 2 threads). The measurement covers every machine and every check, and
each tolerance derived from it holds every measured draw, so a test that passes here passes on
each of those machines; ``make test-portable`` re-runs the numeric tests under two of them."""

from __future__ import annotations

import pytest
from conftest import script

from nfpi import pretrained

portability = script("portability")
MACHINE = ["capability", "onednn", "threads"]


def expected_checks() -> set[tuple[str, str]]:
    legacy = {("legacy", m) for m in ("z", "logdet", "test_nll", "test_bpd", "acc_top1", "acc_top5")}
    shipped = {(f"shipped/{n}", m) for n in pretrained.names() for m in pretrained.RECORDED}
    results = {(f"results/{row}", m) for row, (*_, metrics) in portability.ROWS.items() for m in metrics}
    return legacy | shipped | results


def test_the_measurement_covers_every_machine_and_check():
    table = portability.measured()
    machines = {tuple(m.values()) for m in portability.MATRIX}
    assert set(table[MACHINE].itertuples(index=False, name=None)) == machines
    assert expected_checks() <= set(zip(table["check"], table["metric"]))
    per_machine = table.groupby(["check", "metric", *MACHINE]).size()
    assert (per_machine == 1).all(), per_machine[per_machine != 1]
    assert table["value"].notna().all()


@pytest.mark.parametrize("row", list(portability.ROWS))
def test_every_measured_draw_lies_within_its_tolerance(row):
    """The tolerance of tests/test_results.py holds each of the 12 machines' seed-0 draws."""
    for metric in portability.ROWS[row][3]:
        centre, tol, why = portability.row_tolerance(row, metric)
        values = portability.spread(f"results/{row}", metric)
        worst = float((values - centre).abs().max())
        assert worst <= tol, f"{row} {metric}: a measured draw lies {worst:.2f} from {centre:.2f} > {why}"


def test_the_shipped_flow_tolerances_cover_the_measured_spread():
    """pretrained.tolerance holds twice the largest deviation from the manifest measured on the
    12 machines (a margin for processors we could not emulate)."""
    for name, entry in pretrained.manifest().items():
        for metric in pretrained.RECORDED:
            values = portability.spread(f"shipped/{name}", metric)
            worst = float((values - entry[metric]).abs().max())
            assert 2 * worst <= pretrained.tolerance(entry, metric), (name, metric, worst)
