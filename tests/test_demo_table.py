"""`moepress demo`'s summary table fits an 80-column terminal without folding a header."""

from __future__ import annotations

import io

from rich.console import Console

from moepress.demo import demo_table


def test_demo_table_fits_80_columns_with_whole_headers():
    metrics = {"params/total": 3871872, "params/active_per_token": 1512576, "ppl/geo-mean": 78.25,
               "next_chunk/acc": 0.412, "domain_mc/acc": 0.781}
    rows = {"original": metrics}
    for label in ("frequency", "reap", "mergemoe", "d2moe", "compressed_experts*"):  # the longest label
        rows[label] = {**metrics, "params/total": 2299008, "ppl/geo-mean": 105.93, "next_chunk/acc": 0.2}
    console = Console(width=80, file=io.StringIO(), record=True)
    console.print(demo_table(rows, 0.5))
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in text
    header = "\n".join(lines[:5])
    assert header.count("retained") == 2 and "geo mean" in header and "active" in header
    row = next(line for line in lines if line.startswith("compressed_experts*"))
    assert row.split() == ["compressed_experts*", "2.30M", "1.51M", "105.93", "73.9", "0.200", "0.781", "48.5"]
