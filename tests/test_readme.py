"""The README's command blocks run as written, in order (issue 20).

Every ```bash block of README.md runs, in one shell, in order, in an empty folder, except a block
right after a `<!-- not run: REASON -->` line (installs, downloads from the hub, servers, the suite
itself); each such block must say why, and they stay few.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
NOT_RUN = re.compile(r"<!-- not run: (.+?) -->")


def blocks(text: str) -> list[tuple[str | None, str]]:
    """`(reason it is not run or None, code)` for every ```bash block, in order."""
    found = []
    for match in re.finditer(r"```bash\n(.*?)```", text, re.DOTALL):
        before = text[: match.start()].rstrip().splitlines()
        reason = NOT_RUN.fullmatch(before[-1].strip()) if before else None
        found.append((reason.group(1) if reason else None, match.group(1)))
    return found


def test_the_readme_blocks_run_in_order(tmp_path):
    found = blocks(README.read_text())
    skipped = [reason for reason, _ in found if reason is not None]
    runnable = [code for reason, code in found if reason is None]
    assert len(runnable) >= 4 and len(skipped) <= 6, (len(runnable), skipped)
    assert all(len(reason) > 10 for reason in skipped)
    first, rest = runnable[0], runnable[1:]
    assert first.lstrip().startswith("make demo")  # the two commands on top: `make` is not rerun here
    script = "set -euo pipefail\n" + "\n".join(rest)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MOEPRESS_STATS_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    work = tmp_path / "work"
    work.mkdir()
    run = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"README block failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    for folder in ("ref-d2moe", "ref-reap", "ref-merged", "ref-ce"):
        assert (work / folder / "moepress.json").is_file() and (work / folder / "README.md").is_file()
