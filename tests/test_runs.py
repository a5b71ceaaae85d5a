"""Run directories and atomic files: never a half-written result, never a lost finished run."""

import json
import multiprocessing as mp
import os

import pytest

from marginlab.base.errors import RunDirError
from marginlab.base.fsio import append_jsonl, atomic_write_json, read_jsonl, to_jsonable
from marginlab.lab.runs import RunDir, read_summary


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"x": 1})

    class Boom:
        pass

    with pytest.raises(TypeError):
        atomic_write_json(path, {"x": Boom()})
    assert json.loads(path.read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp file left behind


def test_jsonl_ignores_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"epoch": 0})
    append_jsonl(path, {"epoch": 1})
    with open(path, "a") as f:
        f.write('{"epoch": 2, "lo')  # a kill mid-write
    assert read_jsonl(path) == [{"epoch": 0}, {"epoch": 1}]


def test_to_jsonable_maps_nonfinite_to_null():
    import numpy as np
    import torch

    out = to_jsonable({"a": float("nan"), "b": torch.tensor([1.0, float("inf")]), "c": np.float32(2)})
    assert out == {"a": None, "b": [1.0, None], "c": 2.0}


def test_finished_run_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    rd = RunDir.create(out, {"kind": "x"})
    rd.write_summary({"done": True})
    rd.unlock()
    with pytest.raises(RunDirError, match="already holds a finished run"):
        RunDir.create(out, {"kind": "y"})
    assert read_summary(out) == {"done": True}
    RunDir.create(out, {"kind": "y"}, force=True).unlock()
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1 and read_summary(moved[0]) == {"done": True}


def test_unfinished_run_suggests_resume(tmp_path):
    RunDir.create(tmp_path / "r", {"kind": "x"}).unlock()
    with pytest.raises(RunDirError, match="--resume"):
        RunDir.create(tmp_path / "r", {"kind": "x"})


def _try_lock(path: str, q: "mp.Queue[str]") -> None:
    try:
        RunDir(path).lock()
        q.put("locked")
    except RunDirError as e:
        q.put(str(e))


def test_lock_excludes_a_second_process(tmp_path):
    rd = RunDir.create(tmp_path / "r", {"kind": "x"})
    q: mp.Queue[str] = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=_try_lock, args=(str(rd.path), q))
    p.start()
    p.join(60)
    msg = q.get(timeout=5)
    assert "in use by another process" in msg and str(os.getpid()) in msg
    rd.unlock()


def test_unwritable_directory_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/marginlab-cannot-write-here"  # even root cannot create directories in /proc
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "run")
    with pytest.raises(RunDirError, match="cannot"):
        RunDir.create(target, {"kind": "x"})
