"""Launchers without a SLURM: options and config, the sbatch parameters, the SLURM environment of a
multi-GPU run, the bookkeeping that stops double submission, the waiter's outcomes and ``marginlab status``.

The real cluster is exercised by ``tests/test_slurm_runs.py``; here the queue is a dict handed in place
of ``squeue``'s answer and jobs are small stand-ins with submitit's paths.
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from submitit.core.utils import JobPaths

from marginlab.base.config import from_dict
from marginlab.base.distributed import first_host, slurm_torch_env
from marginlab.base.errors import ConfigError
from marginlab.cli import build_parser
from marginlab.cli import main as cli_main
from marginlab.commands.args import launcher_settings
from marginlab.commands.run import with_launcher
from marginlab.experiments import build_config
from marginlab.lab import slurm, status
from marginlab.lab.launchers import LaunchState, LocalLauncher, SlurmConfig
from marginlab.lab.slurm import SlurmLauncher, SlurmTask, _Waiter, make_launcher, sbatch_parameters
from marginlab.lab.status import lock_held, run_statuses
from marginlab.lab.workers import Outcome


# -- options and config ------------------------------------------------------------------------------
def _args(*argv: str) -> Any:
    return build_parser().parse_args(["sweep", "c.toml", "--grid", "seed=0,1", *argv])


def test_cli_options_become_the_slurm_table() -> None:
    args = _args(
        "--launcher", "slurm", "--partition", "gpu", "--time", "90", "--gpus-per-task", "2",
        "--cpus-per-task", "4", "--mem", "8G", "--array-parallelism", "3", "--slurm-param", "qos=high",
        "--slurm-param", "account=lab", "--slurm-poll", "1.5",
    )  # fmt: skip
    name, table = launcher_settings(args)
    assert name == "slurm"
    cfg = from_dict(SlurmConfig, table, "slurm")
    assert cfg == SlurmConfig("gpu", 90, 2, 4, "8G", 3, {"qos": "high", "account": "lab"}, 1.5)
    assert launcher_settings(_args()) == (None, {})


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--launcher", "pbs"], "unknown launcher 'pbs'"),
        (["--launcher", "local", "--partition", "gpu"], "--partition only apply to --launcher slurm"),
        (["--mem", "8X"], "slurm.mem must be a size such as 8G"),
        (["--time", "0"], "slurm.time (minutes) must be an integer >= 1"),
        (["--slurm-param", "array=0-3"], "'array' is set by marginlab itself"),
        (["--slurm-param", "Bad Key=1"], "is not an sbatch option name"),
        (["--slurm-param", "qos"], "KEY=VALUE"),
    ],
)
def test_bad_launcher_options_are_one_line(argv: list[str], words: str) -> None:
    with pytest.raises(ConfigError, match=None) as e:
        launcher_settings(_args(*argv))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_the_sweep_command_refuses_bad_options_in_one_line(tmp_path: Path, capsys: Any) -> None:
    code = cli_main(["sweep", "x.toml", "--grid", "seed=0", "--launcher", "slurm", "--jobs", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [
        "marginlab: error: --jobs is for the local launcher; with slurm use --array-parallelism"
    ]
    assert not (tmp_path / "runs").exists()


def test_make_launcher() -> None:
    assert make_launcher("local", jobs=3) == LocalLauncher(3)
    assert make_launcher("slurm", slurm=SlurmConfig(time=7)) == SlurmLauncher(SlurmConfig(time=7))
    assert make_launcher("slurm", wait=False) == SlurmLauncher(SlurmConfig(), wait=False)
    with pytest.raises(ConfigError, match="--no-wait is for --launcher slurm"):
        make_launcher("local", wait=False)


def test_without_waiting_the_launcher_submits_and_returns(tmp_path: Path, monkeypatch: Any) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(slurm, "check_slurm_available", lambda: None)
    monkeypatch.setattr(slurm, "queue_states", lambda: {})
    monkeypatch.setattr(SlurmLauncher, "_submit", _fake_submit(calls))
    todo = [({}, tmp_path / name, "new") for name in ("a", "b")]
    assert list(SlurmLauncher(SlurmConfig(), wait=False).execute(todo, print, tmp_path)) == []
    assert calls == [["a", "b"]] and set(LaunchState.load(tmp_path).runs) == {"a", "b"}


COMPARE = {
    "kind": "compare",
    "recipes": ["standard"],
    "bases": [{"name": "b", "eps": 1.0, "config": {"kind": "train", "data": {"dataset": "digits"}}}],
}


def test_compare_config_takes_a_launcher_and_a_slurm_table() -> None:
    _, cfg = build_config(COMPARE | {"launcher": "slurm", "slurm": {"partition": "gpu", "mem": "4G"}})
    assert cfg.launcher == "slurm" and cfg.slurm == SlurmConfig(partition="gpu", mem="4G")
    assert build_config(COMPARE)[1].launcher == "local"
    with pytest.raises(ConfigError, match="jobs is for the local launcher"):
        build_config(COMPARE | {"launcher": "slurm", "jobs": 2})
    with pytest.raises(ConfigError, match="unknown launcher 'k8s'"):
        build_config(COMPARE | {"launcher": "k8s"})
    with pytest.raises(ConfigError, match="unknown config key 'slurm.nodes'"):
        build_config(COMPARE | {"slurm": {"nodes": 2}})


def test_run_command_options_override_a_comparison_only() -> None:
    raw = with_launcher(copy.deepcopy(COMPARE) | {"slurm": {"time": 5}}, "slurm", {"mem": "1G"})
    assert raw["launcher"] == "slurm" and raw["slurm"] == {"time": 5, "mem": "1G"}
    with pytest.raises(ConfigError, match="for comparisons and sweeps only"):
        with_launcher({"kind": "train"}, "slurm", {})
    assert with_launcher({"kind": "train"}, None, {}) == {"kind": "train"}


def test_sbatch_parameters_one_process_per_gpu() -> None:
    one = sbatch_parameters(SlurmConfig(time=10))
    assert one == {"job_name": "marginlab", "time": 10, "ntasks_per_node": 1, "array_parallelism": 256}
    multi = sbatch_parameters(
        SlurmConfig(partition="p", gpus_per_task=4, cpus_per_task=8, params={"mail_type": "END"})
    )
    assert multi["ntasks_per_node"] == 4 and multi["gpus_per_node"] == 4 and multi["cpus_per_task"] == 8
    assert multi["partition"] == "p" and multi["additional_parameters"] == {"mail-type": "END"}


# -- the SLURM environment of a multi-GPU run ---------------------------------------------------------
@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("gpu[03-05,9],cpu1", "gpu03"),
        ("n1,n2", "n1"),
        ("node7", "node7"),
        ("r[2-3]-ib", "r2-ib"),
        ("a[007]", "a007"),
    ],
)
def test_first_host_of_a_node_list(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


def test_slurm_env_becomes_torchruns() -> None:
    env = {"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "g[12-13]",
           "SLURM_JOB_ID": "4242"}  # fmt: skip
    assert slurm_torch_env(env) == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "g12", "MASTER_PORT": "24242",
    }  # fmt: skip
    assert slurm_torch_env({**env, "SLURM_NTASKS": "1"}) == {}  # one process: no group
    assert slurm_torch_env({**env, "RANK": "0"}) == {}  # torchrun inside the job decides
    assert slurm_torch_env({**env, "MASTER_PORT": "1234"})["RANK"] == "3"
    assert "MASTER_PORT" not in slurm_torch_env({**env, "MASTER_PORT": "1234"})


def test_a_task_checkpoints_as_itself() -> None:
    task = SlurmTask(print)
    again = task.checkpoint({"a": 1}, "/x/run", "new")
    assert again.function is task and again.args == ({"a": 1}, "/x/run", "new")
    assert pickle.loads(pickle.dumps(task)).run_fn is print


# -- bookkeeping: never submit twice ------------------------------------------------------------------
def _fake_submit(calls: list[list[str]]) -> Any:
    def submit(self: Any, folder: Path, todo: list[Any], run_fn: Any) -> list[Any]:
        calls.append([Path(p).name for _, p, _ in todo])
        return [SimpleNamespace(job_id=f"9_{k}", paths=JobPaths(folder, f"9_{k}")) for k in range(len(todo))]

    return submit


def test_a_run_whose_job_is_alive_is_attached_not_resubmitted(tmp_path: Path, monkeypatch: Any) -> None:
    home = tmp_path / "sweep"
    state = LaunchState(home)
    state.update(home / "a", job_id="7_0", tasks=1, status="running")
    state.update(home / "b", job_id="7_1", tasks=1, status="running")
    state.save()
    calls: list[list[str]] = []
    monkeypatch.setattr(
        slurm, "queue_states", lambda: {"7_0": "RUNNING", "7_1": "COMPLETED", "8_0": "PENDING"}
    )
    monkeypatch.setattr(SlurmLauncher, "_submit", _fake_submit(calls))
    todo = [({}, home / name, "new") for name in ("a", "b", "c")]
    jobs, state = SlurmLauncher(SlurmConfig())._submit_or_attach(todo, print, home)
    assert calls == [["b", "c"]]  # a is still running as 7_0; b's job ended: submitted again
    assert {i: j.job_id for i, j in jobs.items()} == {0: "7_0", 1: "9_0", 2: "9_1"}
    on_disk = json.loads((home / "launch.json").read_text())["runs"]
    assert {k: v["job_id"] for k, v in on_disk.items()} == {"a": "7_0", "b": "9_0", "c": "9_1"}
    assert on_disk["c"]["log"] == str(home / "slurm" / "9_1_0_log.err")


def test_without_squeue_recorded_live_jobs_are_not_resubmitted(tmp_path: Path, monkeypatch: Any) -> None:
    state = LaunchState(tmp_path)
    state.update(tmp_path / "a", job_id="7_0", status="running")
    state.save()
    calls: list[list[str]] = []
    monkeypatch.setattr(slurm, "queue_states", lambda: None)
    monkeypatch.setattr(SlurmLauncher, "_submit", _fake_submit(calls))
    with pytest.raises(ConfigError, match="squeue does not answer"):
        SlurmLauncher(SlurmConfig())._submit_or_attach([({}, tmp_path / "a", "new")], print, tmp_path)
    assert calls == []
    SlurmLauncher(SlurmConfig())._submit_or_attach([({}, tmp_path / "b", "new")], print, tmp_path)
    assert calls == [["b"]]  # nothing recorded for b: nothing to submit twice


# -- waiting: outcomes, failures with their log -------------------------------------------------------
class _Job:
    def __init__(self, folder: Path, job_id: str, result: Any = None) -> None:
        self.job_id, self.paths, self._result = job_id, JobPaths(folder, job_id), result

    def finish(self) -> None:
        self.paths.result_pickle.parent.mkdir(parents=True, exist_ok=True)
        self.paths.result_pickle.write_bytes(b"")

    def results(self) -> list[Any]:
        if isinstance(self._result, Exception):
            raise self._result
        return [self._result]


def test_the_waiter_reports_starts_outcomes_and_lost_jobs(tmp_path: Path, monkeypatch: Any) -> None:
    folder, home = tmp_path / "slurm", tmp_path
    ok, bad, lost = (_Job(folder, "5_0", Outcome(None, seconds=1.0)), _Job(folder, "5_1", Outcome("boom")),
                     _Job(folder, "5_2"))  # fmt: skip
    queues = iter([{"5_0": "RUNNING", "5_1": "PENDING", "5_2": "RUNNING"}, {"5_1": "RUNNING"}, {}, {}])
    monkeypatch.setattr(slurm, "queue_states", lambda: next(queues))
    monkeypatch.setattr(slurm, "_RESULT_GRACE_S", 0.0)
    todo = [({}, home / n, "new") for n in ("a", "b", "c")]
    state = LaunchState(home)
    waiter = _Waiter(todo, {0: ok, 1: bad, 2: lost}, state, poll_s=0.001)
    events = []
    for i, outcome in waiter.events():
        events.append((i, outcome))
        if (i, outcome) == (0, None):
            ok.finish()
        if (i, outcome) == (1, None):
            bad.finish()
    assert [(i, o is None) for i, o in events] == [
        (0, True),
        (2, True),
        (0, False),
        (1, True),
        (1, False),
        (2, False),
    ]
    outcomes = {i: o for i, o in events if o is not None}
    assert outcomes[0].error is None
    assert outcomes[1].error == f"boom (log: {folder / '5_1_0_log.err'})"
    assert (
        outcomes[2].error.startswith("SLURM job 5_2 ended without a result")
        and str(folder / "5_2_0_log.err") in outcomes[2].error
    )
    assert {k: v["status"] for k, v in state.runs.items()} == {"a": "finished", "b": "failed", "c": "failed"}


# -- marginlab status ---------------------------------------------------------------------------------
def _run_dir(path: Path, epochs: int, done: int | None, finished: bool = False) -> None:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"kind": "train", "train": {"epochs": epochs}}))
    if done is not None:
        lines = [json.dumps({"epoch": e, "time": 0.1}) for e in range(done + 1)]
        (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if finished:
        (path / "summary.json").write_text("{}")


def test_status_of_a_sweep(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    home = tmp_path / "sw"
    names = ["fin", "fail", "run", "queued", "stopped", "todo"]
    manifest = {"runs": [{"name": n, "status": "failed" if n == "fail" else "pending", "error": "lr too big"}
                         for n in names]}  # fmt: skip
    home.mkdir()
    (home / "sweep.json").write_text(json.dumps(manifest))
    _run_dir(home / "fin", 3, 3, finished=True)
    _run_dir(home / "fail", 3, 1)
    _run_dir(home / "run", 5, 2)
    _run_dir(home / "stopped", 5, 4)
    state = LaunchState(home)
    state.update(home / "queued", job_id="3_3", log="/logs/3_3_0_log.err", status="queued")
    state.update(home / "stopped", job_id="3_4", status="running")  # its job is gone: interrupted
    state.save()
    monkeypatch.setattr(status, "queue_states", lambda: {"3_3": "PENDING"})
    fd = os.open(home / "run" / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live process runs it here
    try:
        assert lock_held(home / "run") and not lock_held(home / "fin")
        got = {s.name: s for s in run_statuses(home)}
        assert cli_main(["status", str(home)]) == 0
    finally:
        os.close(fd)
    assert {n: s.state for n, s in got.items()} == {
        "fin": "finished", "fail": "failed", "run": "running", "queued": "queued", "stopped": "interrupted",
        "todo": "pending",
    }  # fmt: skip
    assert (got["run"].epoch, got["run"].total) == (2, 5) and got["fail"].error == "lr too big"
    assert got["queued"].job_id == "3_3" and got["queued"].log == "/logs/3_3_0_log.err"
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()]
    assert ["run", "running", "2/5"] in lines and ["queued", "queued", "3_3", "/logs/3_3_0_log.err"] in lines
    assert "    error: lr too big" in out.splitlines()
    assert out.strip().endswith("6 runs: 1 pending, 1 queued, 1 running, 1 finished, 1 failed, 1 interrupted")


def test_status_of_a_comparison_lists_its_subruns(tmp_path: Path) -> None:
    home = tmp_path / "cmp"
    home.mkdir()
    cfg = {"kind": "compare", "bases": [{"name": "b"}], "seeds": [0], "recipes": ["standard", "regularized"]}
    (home / "config.json").write_text(json.dumps(cfg))
    _run_dir(home / "runs" / "b" / "standard-seed0", 2, 2, finished=True)  # trained, not yet evaluated
    got = run_statuses(home)
    assert [(s.name, s.state) for s in got] == [
        ("runs/b/standard-seed0", "interrupted"), ("runs/b/regularized-seed0", "pending"),
    ]  # fmt: skip
    (home / "runs" / "b" / "standard-seed0" / "robustness.json").write_text("{}")
    assert run_statuses(home)[0].state == "finished"


def test_status_of_something_else_is_one_line(tmp_path: Path, capsys: Any) -> None:
    assert cli_main(["status", str(tmp_path)]) == 2
    assert "is not a sweep or comparison directory" in capsys.readouterr().err
