"""Faults: runs killed at a random moment and shards writing one folder at the same time.

A killed run must never leave an output that a rerun would take as finished
(``run.json`` is the completion record of ``recon ct``, ``cases/NAME.json``
with ``complete: true`` that of a ``recon compare`` case), and a rerun with
the same arguments must finish the job.  Two shards of one manifest writing
into the same folder must never leave a ``metrics.csv`` that does not parse.
The kill moments are random but seeded, so a failure can be replayed.
"""
import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from recon.outputs import METRIC_COLUMNS, OutputFolder

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _start(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "recon.cli", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def _rerun(args):
    """Rerun in this process (torch is already imported here): exit status and stderr."""
    import contextlib

    from recon.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, err.getvalue()


def _wait_for(condition, proc, timeout=120.0):
    """Poll until ``condition()`` or the process ends; True when the condition held."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def _kill_later(proc, sig, rnd, condition, spread):
    """Send ``sig`` a random delay (0..spread s) after ``condition`` first holds."""
    _wait_for(condition, proc)
    time.sleep(rnd.uniform(0.0, spread))
    if proc.poll() is None:
        proc.send_signal(sig)
    return _finish(proc)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fault-cases")
    rng = np.random.default_rng(0)
    for i in range(4):
        x = np.zeros((24, 24), np.float32)
        x[5:19, 4 + i:17 + i // 2] = 1.0
        np.save(folder / f"c{i}.npy", x + 0.05 * rng.random((24, 24), dtype=np.float32))
    (folder / "m.txt").write_text("".join(f"c{i}.npy\n" for i in range(4)))
    return folder


# ---------------------------------------------------------------------------
# single runs
# ---------------------------------------------------------------------------
def _check_no_false_finish(out: Path):
    """``run.json`` absent, or complete: valid JSON whose listed outputs all exist."""
    record = out / "run.json"
    if not record.exists():
        return False
    rec = json.loads(record.read_text())
    missing = [name for name in rec["outputs"] if not (out / name).exists()]
    assert not missing, f"run.json present but {missing} missing"
    assert rec["fingerprint"] and rec["method"]["name"] == "sirt"
    return True


def test_commit_moves_the_completion_record_last(tmp_path, monkeypatch):
    """A kill between any two moves of the staged outputs never leaves run.json
    next to an incomplete set (the in-process version of the window below)."""
    from recon.single import SINGLE_OUTPUTS

    names = ["dicom", "metrics.json", "recon.nii.gz", "recon.png", "run.json", "sinogram.npy", "std.npy"]
    real_replace = os.replace
    for k in range(len(names)):
        out = tmp_path / f"out{k}"
        folder = OutputFolder(out, reserved=SINGLE_OUTPUTS).prepare()
        (folder.stage / "dicom").mkdir()
        for name in names[1:]:
            (folder.stage / name).write_text("{}" if name.endswith(".json") else "x")
        (folder.stage / "run.json").write_text(json.dumps({"outputs": names}))
        moves = []

        def killed_after_k_moves(src, dst, moves=moves, k=k):
            if len(moves) == k:
                raise KeyboardInterrupt  # the process dies here
            moves.append(src)
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", killed_after_k_moves)
        with pytest.raises(KeyboardInterrupt):
            folder.commit()
        monkeypatch.setattr(os, "replace", real_replace)
        if (out / "run.json").exists():
            assert all((out / n).exists() for n in names), f"killed after {k} moves"


@pytest.mark.slow
def test_killed_single_run_then_rerun(images, tmp_path):
    """SIGKILL and SIGINT at a random moment of ``recon ct``; then the rerun finishes."""
    rnd = random.Random(1)
    out = tmp_path / "out"
    args = ["ct", images / "c0.npy", "--views", "8", "--method", "sirt", "--param", "n_iter=100",
            "--out", out]

    def stages():
        return {p.name for p in out.iterdir() if p.name.startswith(".recon-staging-")} if out.is_dir() else set()

    for sig in (signal.SIGKILL, signal.SIGINT):
        old = stages()  # a SIGKILLed run leaves its staging folder behind
        rc, log = _kill_later(_start(args, tmp_path), sig, rnd, lambda: stages() - old, spread=1.0)
        # 130: recon's handler; -SIGINT: interrupted before recon.cli.main took over
        assert rc in (0, 130, -signal.SIGINT, -signal.SIGKILL), log
        if rc == 130:
            assert "interrupted" in log
            assert stages() <= old, "SIGINT left its staging folder"
        finished = out.is_dir() and _check_no_false_finish(out)  # a present run.json is whole
        # rc 0 means finished; a signal may still land between the atomic commit and the exit
        # (interpreter shutdown), which leaves a whole output and a signal status: never a half one
        assert finished or rc != 0, (rc, log)
        if finished and rc != 0:
            assert sig == signal.SIGKILL or "wrote" in log, (rc, log)
    rc, log = _rerun(args)
    assert rc == 0, log
    assert _check_no_false_finish(out)
    rec = json.loads((out / "run.json").read_text())
    assert {"recon.nii.gz", "recon.png", "run.json"} <= set(rec["outputs"])


# ---------------------------------------------------------------------------
# compare: a killed shard, and two shards writing at the same time
# ---------------------------------------------------------------------------
_METHODS = "fbp,sirt"


def _compare_args(images, out, shard):
    return ["compare", "ct", "--manifest", images / "m.txt", "--shard", shard, "--methods", _METHODS,
            "--param", "sirt.n_iter=15", "--views", "8", "--out", out]


def _compare(images, out, shard):
    return _start(_compare_args(images, out, shard), images)


def _parse_metrics(path: Path) -> list[dict]:
    text = path.read_text()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows and tuple(rows[0]) == METRIC_COLUMNS, text[:200]
    assert all(len(r) == len(METRIC_COLUMNS) for r in rows[1:]), text
    for r in rows[1:]:
        float(r[2]), float(r[3]), float(r[4]), float(r[5])
    return [dict(zip(METRIC_COLUMNS, r)) for r in rows[1:]]


def _markers(out: Path) -> dict[str, dict]:
    recs = {}
    for p in sorted((out / "cases").glob("*.json")):
        rec = json.loads(p.read_text())  # written atomically: always whole
        if rec.get("complete"):
            assert {r["method"] for r in rec["rows"]} == set(_METHODS.split(",")), rec
            assert not rec["failures"]
        recs[p.stem] = rec
    return recs


@pytest.mark.slow
def test_shards_in_one_folder_with_one_killed(images, tmp_path):
    rnd = random.Random(2)
    out = tmp_path / "cmp"
    shard0, shard1 = _compare(images, out, "0/2"), _compare(images, out, "1/2")
    cases = out / "cases"
    killed = False
    while shard0.poll() is None or shard1.poll() is None:
        if (out / "metrics.csv").exists():
            _parse_metrics(out / "metrics.csv")  # parses at every moment
        if not killed and cases.is_dir() and any(cases.glob("0001_*.json")):
            time.sleep(rnd.uniform(0.0, 0.6))  # shard 1 has finished its first case
            if shard1.poll() is None:
                shard1.send_signal(signal.SIGKILL)
            killed = True
        time.sleep(0.01)
    rc0, log0 = _finish(shard0)
    rc1, log1 = _finish(shard1)
    assert rc0 == 0, log0
    assert rc1 in (0, -signal.SIGKILL), log1
    before = _markers(out)
    shard1_names = {f"{i:04d}_c{i}" for i in (1, 3)}
    complete = {name for name, rec in before.items() if rec.get("complete")}
    assert {f"{i:04d}_c{i}" for i in (0, 2)} <= complete  # shard 0 finished
    # the killed shard's rerun skips exactly its complete cases and does the rest
    rc, log = _rerun(_compare_args(images, out, "1/2"))
    assert rc == 0, log
    skipped = {line.split(":")[0] for line in log.splitlines() if line.endswith("done already, skipped")}
    assert skipped == complete & shard1_names, log
    # a rerun with everything skipped rebuilds metrics.csv from all shards
    rc, log = _rerun(_compare_args(images, out, "0/2"))
    assert rc == 0, log
    assert log.count("done already, skipped") == 2
    rows = _parse_metrics(out / "metrics.csv")
    assert {(r["case"], r["method"]) for r in rows} == \
        {(f"{i:04d}_c{i}", m) for i in range(4) for m in _METHODS.split(",")}
    assert all(rec.get("complete") for rec in _markers(out).values())


def test_orphaned_staging_folders_of_dead_processes_are_removed(tmp_path):
    """A run killed with SIGKILL leaves its staging folder; the next run into the same folder
    removes it, but never the staging folder of a live process (another shard)."""
    import os
    import subprocess
    import sys

    from recon.outputs import OutputFolder

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f".recon-staging-{dead.pid}-abc"
    live = tmp_path / f".recon-staging-{os.getpid()}-xyz"
    orphan.mkdir()
    live.mkdir()
    (orphan / "run.json").write_text("{}")
    with OutputFolder(tmp_path, reserved=("run.json",)) as folder:
        (folder.stage / "run.json").write_text("{}")
    assert not orphan.exists() and live.exists() and (tmp_path / "run.json").exists()


def test_a_reference_file_named_full_is_protected():
    """CT's ``--reference full[:METHOD]`` names no file, but an MRI reference file whose name starts
    with "full" is an input like any other and must never be overwritten."""
    from types import SimpleNamespace

    from recon.execute import protected_inputs

    inputs = SimpleNamespace(path=None)
    assert protected_inputs(SimpleNamespace(reference="full"), inputs) == []
    assert protected_inputs(SimpleNamespace(reference="full:tv"), inputs) == []
    assert protected_inputs(SimpleNamespace(reference="full_dose.nii.gz"), inputs) == ["full_dose.nii.gz"]
