"""Two runs on one output (issue 20): the second is refused at once with one line naming the first,
which then completes; a lock left by a dead run is taken over; no lock or temporary folder stays."""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import transformers
from typer.testing import CliRunner

import moepress
import moepress.api
from moepress import output_lock
from moepress.cli import app

runner = CliRunner()
SRC_DIR = str(Path(__file__).parents[1] / "src")

# The real CLI in a subprocess, held once layer 0 is stored in .OUT.work until the file `go` appears.
HELD_RUN = """
import sys, time, pathlib
from moepress.run import store as layer_store
hold = pathlib.Path(sys.argv[1])
stored = layer_store.StreamingLayers.offload
def offload(self, index, record=None):
    stored(self, index, record)
    if index == 0:
        (hold / "held").write_text("")
        while not (hold / "go").exists():
            time.sleep(0.05)
layer_store.StreamingLayers.offload = offload
sys.argv = ["moepress", *sys.argv[2:]]
from moepress.cli import app
app(prog_name="moepress")
"""


def tree_hash(path: Path) -> str:
    """Hash of every file's name, bytes and mode under `path` (as tests/test_bad_input.py)."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(p.relative_to(path.parent)).encode())
        h.update(p.read_bytes())
        h.update(str(p.stat().st_mode).encode())
    return h.hexdigest()


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": SRC_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def start_held(tmp: Path, args: list[str], hold: Path, wait: bool = True) -> subprocess.Popen:
    """Start `moepress ARGS`, returning once it holds layer 0 (`wait`; it then waits for `hold/go`)."""
    hold.mkdir(exist_ok=True)
    script = tmp / "held_run.py"
    script.write_text(HELD_RUN)
    proc = subprocess.Popen([sys.executable, str(script), str(hold), *args], env=_env(), cwd=tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        wait_until_held(proc, hold)
    return proc


def wait_until_held(proc: subprocess.Popen, hold: Path) -> None:
    deadline = time.monotonic() + 120
    while not (hold / "held").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"the held run ended before layer 0 was stored: {out}{err}")
        time.sleep(0.05)


def moepress_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moepress", *args], env=_env(), cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def _compress_args(src, calib_file, out) -> list[str]:
    return ["compress", str(src), "-m", "reap", "--ratio", "0.5", "--calib", str(calib_file), "--samples", "4",
            "--seq-len", "32", "-o", str(out), "--quiet"]


def test_a_second_run_on_a_running_output_is_refused_and_the_first_completes(tiny_checkpoint, calib_file,
                                                                              tmp_path):
    src = tiny_checkpoint("mixtral")
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("an earlier output, replaced only when the first run ends")
    watched = {p: tree_hash(p) for p in (src, out)}
    first = start_held(tmp_path, _compress_args(src, calib_file, out) + ["--overwrite"], tmp_path / "hold")
    try:
        lock = tmp_path / ".out.lock"
        assert json.loads(lock.read_text())["pid"] == first.pid
        progress = (tmp_path / ".out.work" / "progress.json").read_text()
        for args in (_compress_args(src, calib_file, out) + ["--overwrite"],
                     _compress_args(src, calib_file, out),  # without --overwrite: the live run is named first
                     ["quantize", str(src), "--out", str(out), "--overwrite"]):
            second = moepress_cli(args, tmp_path)
            lines = [line for line in (second.stdout + second.stderr).splitlines() if line.strip()]
            assert second.returncode == 2, second.stdout + second.stderr
            assert len(lines) == 1 and lines[0].startswith("error: "), lines
            assert f"pid {first.pid} on host {socket.gethostname()}" in lines[0], lines[0]
            assert "moepress compress" in lines[0] and "is being written by another moepress run" in lines[0]
        assert {p: tree_hash(p) for p in watched} == watched  # nothing touched while the first runs
        assert (tmp_path / ".out.work" / "progress.json").read_text() == progress
        assert json.loads(lock.read_text())["pid"] == first.pid
    finally:
        (tmp_path / "hold" / "go").write_text("")
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stdout + stderr
    assert "checkpoint:" in stdout
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.num_local_experts == 4
    assert not (out / "previous.txt").exists() and tree_hash(src) == watched[src]
    assert not lock.exists() and not (tmp_path / ".out.work").exists()


def test_a_lock_left_by_a_dead_run_is_taken_over(tiny_checkpoint, calib_file, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / ".out.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier",
                                "command": "moepress compress killed -9"}))
    res = runner.invoke(app, _compress_args(tiny_checkpoint("mixtral"), calib_file, tmp_path / "out"))
    assert res.exit_code == 0, res.output
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_local_experts == 4
    assert not lock.exists()


def test_the_lock_is_reentrant_in_a_process_and_removed_by_its_last_holder(tmp_path):
    out = tmp_path / "deep" / "er" / "out"
    outer = output_lock.acquire(out)
    inner = output_lock.acquire(out)  # the CLI holds it, the API it calls takes it again
    path = output_lock.lock_path(out)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    inner.release()
    assert path.exists()
    outer.release()
    outer.release()  # idempotent
    assert not path.exists() and not (tmp_path / "deep").exists()  # parents made for the lock go too
    assert output_lock.acquire(out, main_process=False).path is None  # ranks other than 0 hold nothing
    assert not path.exists()


def test_an_unsaved_result_leaves_no_temporary_work_folder(tiny_checkpoint, calib_file, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    kwargs = dict(calib=calib_file, samples=4, seq_len=32, offload=True)
    result = moepress.compress(tiny_checkpoint("mixtral"), "frequency", 0.5, **kwargs)
    assert result.store is not None and len(list(tmp_path.glob("moepress-work-*"))) == 1
    del result
    gc.collect()
    assert not list(tmp_path.glob("moepress-work-*"))

    def fail_after_first_layer(done, total, text):
        if done == 1:
            raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):  # nobody could resume from a temporary folder
        moepress.compress(tiny_checkpoint("mixtral"), "frequency", 0.5, progress=fail_after_first_layer, **kwargs)
    assert not list(tmp_path.glob("moepress-work-*"))


def test_the_api_quantize_and_finetune_refuse_an_output_another_run_holds(tiny_checkpoint, tmp_path):
    from moepress.methods.compressed_experts.finetune import FinetuneConfig

    out, ready = tmp_path / "out", tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, pathlib\nfrom moepress import output_lock\n"
        f"lock = output_lock.acquire({str(out)!r})\npathlib.Path({str(ready)!r}).touch()\ntime.sleep(120)\n")],
        env=_env())
    try:
        deadline = time.time() + 60
        while not ready.exists():
            assert holder.poll() is None and time.time() < deadline, "the holder did not take the lock"
            time.sleep(0.1)
        src = tiny_checkpoint("mixtral")
        with pytest.raises(output_lock.OutputBusyError, match=f"pid {holder.pid}"):
            moepress.quantize(src, "int8", out=out)
        with pytest.raises(output_lock.OutputBusyError, match=f"pid {holder.pid}"):
            moepress.api.finetune_checkpoint(src, None, out, FinetuneConfig(steps=1))
        assert not out.exists() and not (tmp_path / "out.state").exists()
    finally:
        holder.kill()
        holder.wait()
    # once the holder is gone the same calls take the lock, write, and leave no lock behind
    assert moepress.quantize(tiny_checkpoint("mixtral"), "int8", out=out) == out.resolve()
    assert not output_lock.lock_path(out).exists()
