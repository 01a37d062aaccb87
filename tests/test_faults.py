"""Faults end in one line, bugs keep their traceback, and a run directory belongs to one job."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from solarjax import files
from solarjax.cli import train as train_cli
from solarjax.errors import ConfigError, SolarjaxError
from solarjax.cli import sample as sample_cli
from solarjax.eval import sample
from solarjax.train import rundir
from solarjax.train.rundir import LOCK_FILE, RunDirBusyError, RunLock

from hf_models import make_hf_model, save_hf_model, tokenizer_file

ROOT = Path(__file__).resolve().parent.parent


# -- one error family ------------------------------------------------------------------------

def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback(tmp_path, capsys, monkeypatch):
    (tmp_path / "c.yaml").write_text("model: {preset: tiny}\noptim: {lr: 1}\n")
    assert train_cli.main(["--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'c.yaml'}: optim: unknown key 'lr'")

    def bug(*args, **kwargs):  # a plain ValueError inside solarjax is a bug, not the user's fault
        raise ValueError("an internal invariant broke")
    monkeypatch.setattr("solarjax.train.config.load_job", bug)
    with pytest.raises(ValueError, match="an internal invariant broke"):
        train_cli.main(["--config", str(tmp_path / "c.yaml")])

    monkeypatch.undo()
    monkeypatch.setenv("SOLARJAX_DEBUG", "1")  # for bug reports: the user error's traceback too
    with pytest.raises(ConfigError, match="unknown key 'lr'"):
        train_cli.main(["--config", str(tmp_path / "c.yaml")])


def test_every_error_class_meant_for_the_user_is_a_solarjax_error():
    from solarjax import data, tokenizer
    from solarjax.data import records
    from solarjax.errors import DiskFullError, MissingInputError, OutputExistsError
    from solarjax.eval import tasks
    from solarjax.train import trainer
    from solarjax.weights import hf, merge, tensorfile, upscale
    classes = [data.DataError, tasks.TaskError, hf.ConversionError, merge.MergeError, records.RecordError,
               sample.SamplingError, tensorfile.TensorFileError, tokenizer.TokenizerError, upscale.UpscaleError,
               trainer.CheckpointError, trainer.NonFiniteLossError, ConfigError, MissingInputError,
               OutputExistsError, DiskFullError, RunDirBusyError]
    assert all(issubclass(c, SolarjaxError) for c in classes)
    # and the file errors stay what callers of the Python API catch
    assert issubclass(MissingInputError, FileNotFoundError) and issubclass(OutputExistsError, FileExistsError)


def test_a_hostile_chat_template_ends_in_one_line_and_runs_nothing(tmp_path, capsys):
    """A model directory is untrusted: a template that reaches for Python internals to run a
    command is refused by the sandbox, and the CLI says so in one line naming the file."""
    model = save_hf_model(make_hf_model("mistral", vocab_size=32000, hidden_size=32, intermediate_size=64,
                                        head_dim=8, num_hidden_layers=1), tmp_path / "hf")
    shutil.copy(tokenizer_file(), model / "tokenizer.model")
    marker = tmp_path / "pwned"
    attack = ("{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
              "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    (model / "chat_template.jinja").write_text(attack)
    capsys.readouterr()
    code = sample_cli.main(["--hf", str(model), "--prompt", "hi", "--chat", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists()
    assert "Traceback" not in err and len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert f"error: {model / 'chat_template.jinja'}: the chat template cannot be rendered (SecurityError" in err
    # A template that fails for an ordinary reason (an undefined filter) is named the same way.
    (model / "chat_template.jinja").write_text("{{ messages | nosuchfilter }}")
    assert sample_cli.main(["--hf", str(model), "--prompt", "hi", "--chat", "--max-new-tokens", "2"]) == 2
    assert "chat_template.jinja: the chat template cannot be rendered" in capsys.readouterr().err


# -- one job per run directory ---------------------------------------------------------------

def _write_lock(run: Path, **fields) -> None:
    run.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "boot": files.boot_id(), "pidns": files.pid_namespace(),
              "pid": os.getpid(), "started": time.time(), "heartbeat": time.time(), "token": "someone-else", **fields}
    (run / LOCK_FILE).write_text(json.dumps(record))


def test_a_live_holder_refuses_and_a_dead_or_silent_one_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(run, pid=sleeper.pid)  # a live process on this host
        with pytest.raises(RunDirBusyError, match=rf"run directory {run} is in use by pid {sleeper.pid} on host "
                                                  rf"{socket.gethostname()}.*remove {run / LOCK_FILE}"):
            RunLock(run).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = RunLock(run).acquire()  # the same pid, now dead: freed at once
    assert f"its holder, pid {sleeper.pid} on this host ({socket.gethostname()}), is no longer running" in \
        capsys.readouterr().err
    assert json.loads((run / LOCK_FILE).read_text())["token"] == lock.token
    lock.release()
    assert not (run / LOCK_FILE).exists()

    # Another host: its pid cannot be asked, its heartbeat can. Fresh: refused; stale: taken over.
    _write_lock(run, host="node-17", pid=4242, heartbeat=time.time() - 30)
    with pytest.raises(RunDirBusyError, match="in use by pid 4242 on host node-17 .*heartbeat 30 s ago"):
        RunLock(run).acquire()
    _write_lock(run, host="node-17", pid=4242, heartbeat=time.time() - rundir.STALE_S - 60)
    lock = RunLock(run).acquire()
    assert "pid 4242 on host node-17, last showed a heartbeat" in capsys.readouterr().err
    lock.release()


def test_the_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path).acquire()
    first = json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"]
    time.sleep(0.5)
    later = json.loads((tmp_path / LOCK_FILE).read_text())
    lock.release()
    assert later["heartbeat"] > first and later["token"] == lock.token and later["pid"] == os.getpid()


def test_a_holder_in_another_pid_namespace_is_judged_by_its_heartbeat(tmp_path, capsys):
    """A container that shares the hostname but not the PIDs: its holder's pid means nothing here
    (the pid may be free here while the holder runs), so a fresh heartbeat keeps the lock and only
    a stale one frees it. A holder from before the host's last boot is gone at once."""
    run = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # no longer running here
    _write_lock(run, pid=pid, pidns="pid:[1]", heartbeat=time.time() - 60)
    with pytest.raises(RunDirBusyError, match=f"in use by pid {pid} on host {socket.gethostname()}"):
        RunLock(run).acquire()
    _write_lock(run, pid=pid, pidns="pid:[1]", heartbeat=time.time() - rundir.STALE_S - 60)
    RunLock(run).acquire().release()
    assert "last showed a heartbeat" in capsys.readouterr().err
    if files.boot_id():
        _write_lock(run, pid=os.getppid(), boot="an-earlier-boot")  # its pid runs now, but it is another process
        RunLock(run).acquire().release()
        assert "ran before the host last booted" in capsys.readouterr().err


RACER = """
import os, sys, time
from pathlib import Path
from solarjax.train import rundir
run, me, slow = sys.argv[1], sys.argv[2], sys.argv[3] == "slow"
flag = Path(run).parent / "first-holds"
if slow:  # reads the stale lock, then waits for the other job to take it before moving it aside
    real = os.rename
    def rename(a, b):
        while not flag.exists():
            time.sleep(0.01)
        return real(a, b)
    os.rename = rename
try:
    lock = rundir.RunLock(run).acquire()
except rundir.RunDirBusyError as e:
    print("busy", e, flush=True)
    sys.exit(0)
print("held", lock.token, flush=True)
flag.touch()
time.sleep(3)
print("still", lock.check(), flush=True)
"""


def test_two_jobs_racing_for_a_stale_lock_leave_exactly_one_holder(tmp_path):
    """Both read the same stale lock; the slower one moves it aside only after the faster one has
    taken the lock over. It must find that what it moved is the winner's fresh lock, put it back,
    and refuse: one holder, which still holds at the end."""
    run = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _write_lock(run, pid=int(dead.stdout))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    slow = subprocess.Popen([sys.executable, "-c", RACER, str(run), "b", "slow"], stdout=subprocess.PIPE,
                            text=True, env=env)
    time.sleep(1.0)  # the slow one has read the stale lock and waits at its rename
    fast = subprocess.Popen([sys.executable, "-c", RACER, str(run), "a", "fast"], stdout=subprocess.PIPE,
                            text=True, env=env)
    outs = [p.communicate(timeout=60)[0] for p in (fast, slow)]
    assert outs[0].startswith("held ") and "still True" in outs[0], outs
    assert outs[1].startswith("busy ") and f"in use by pid {fast.pid}" in outs[1], outs
    assert not list(run.glob(f"{LOCK_FILE}.stale-*"))


def test_every_process_learns_that_process_0_could_not_take_the_lock(tmp_path, monkeypatch):
    """A failure other than a busy lock (here a read-only run directory) on process 0 reaches the
    broadcast, so the other processes stop too instead of waiting for it forever."""
    told = []
    monkeypatch.setattr(rundir.jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(rundir.jax, "process_count", lambda: 2)
    monkeypatch.setattr(rundir.multihost_utils, "broadcast_one_to_all", lambda x: told.append(int(x)) or x)

    def refuse(self):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(RunLock, "acquire", refuse)
    monkeypatch.setattr(rundir.jax, "process_index", lambda: 0)
    with pytest.raises(rundir.RunDirError, match=rf"run directory {tmp_path}: cannot take its lock run.lock "
                                                 r"\(Permission denied\)"):
        rundir.lock_run_dir(tmp_path)
    assert told == [0]
    monkeypatch.setattr(rundir.jax, "process_index", lambda: 1)  # another process: process 0 says 0
    monkeypatch.setattr(rundir.multihost_utils, "broadcast_one_to_all", lambda x: np.int32(0))
    with pytest.raises(rundir.RunDirError, match="process 0 could not take its lock"):
        rundir.lock_run_dir(tmp_path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.RandomState(0)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    for i in range(40):
        (folder / f"d{i:02d}.txt").write_text(" ".join(" ".join(words[:rng.randint(3, 8)]) for _ in range(30)))
    return folder


def _job(tmp_path, corpus, **over) -> list[str]:
    d = {"model": {"preset": "tiny", "vocab_size": 32000, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4,
                   "num_kv_heads": 2, "head_dim": 8},
         "data": {"sources": [str(corpus)], "seq_len": 64, "num_proc": 1, "cache_dir": str(tmp_path / "cache")},
         "optim": {"learning_rate": 1e-2, "warmup_steps": 2}, "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
         "run_dir": str(tmp_path / "run"), "steps": 8, "global_batch": 4, "log_every": 1, "eval_every": 0,
         "checkpoint_every": 4, **over}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "job.yaml").write_text(json.dumps(d))
    return [sys.executable, str(ROOT / "train.py"), "--config", str(tmp_path / "job.yaml")]


ENV = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}


def test_a_job_whose_lock_is_taken_stops_at_the_next_step_writing_nothing_more(tmp_path, corpus):
    """Another job takes the lock over while this one trains (its lock looked stale to that job):
    this one stops at the next step boundary with one line; no metrics line, checkpoint or final/
    after it, and the other job's lock stays."""
    import jax

    import solarjax
    from solarjax.train.config import train_config_from_dict
    from solarjax.train.trainer import Trainer
    cmd = _job(tmp_path, corpus, steps=8, checkpoint_every=2)
    cfg = train_config_from_dict(json.loads(Path(cmd[-1]).read_text()))
    trainer = Trainer(cfg, solarjax.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    step, calls = trainer.train_step, []

    def taken_over_during_step_3(*args):
        calls.append(1)
        if len(calls) == 3:
            _write_lock(tmp_path / "run", host="node-9", pid=99)
        return step(*args)
    trainer.train_step = taken_over_during_step_3
    with pytest.raises(RunDirBusyError) as e:
        trainer.run()
    assert str(e.value) == (f"run directory {tmp_path / 'run'}: its lock was taken over by pid 99 on host node-9 "
                            f"while this job ran; this job stops here and writes nothing more")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    assert not (tmp_path / "run" / "final").exists()
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["host"] == "node-9"


@pytest.mark.slow
def test_a_second_job_on_a_run_directory_is_refused(tmp_path, corpus):
    """The same command started twice: the second stops at once with one line naming the holder,
    touching nothing; the first trains on (until SIGTERM stops it), its metrics hold each step once."""
    cmd = _job(tmp_path, corpus, steps=100000)
    first = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.time() + 180
        while time.time() < deadline and first.poll() is None and not metrics.exists():
            time.sleep(0.1)
        second = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=180)
        assert first.poll() is None, first.stderr.read()[-2000:]
        first.send_signal(signal.SIGTERM)
        err = first.communicate(timeout=180)[1]
    finally:
        first.kill()
    assert second.returncode == 2
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: run directory {tmp_path / 'run'} is in use by pid {first.pid} on host {socket.gethostname()}"), \
        second.stderr[-2000:]
    assert "model:" not in second.stderr  # refused before it built anything
    assert first.returncode == 0 and "stopped by SIGTERM at step" in err, err[-2000:]
    stopped = int(err.split("stopped by SIGTERM at step ")[1].split(";")[0])
    steps = [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, stopped + 1))
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released at the end


@pytest.mark.slow
def test_disk_full_while_saving_ends_in_one_line_and_resumes_exactly(tmp_path, corpus, capsys, monkeypatch):
    """A full disk at step 8's checkpoint (orbax reports it as RESOURCE_EXHAUSTED from its writer):
    the CLI prints one line naming the folder and the last complete checkpoint, exits 2, leaves
    step 4 intact; once space is back the same command resumes from step 4 and ends where a run
    that never failed ends."""
    import orbax.checkpoint as ocp

    from solarjax.train.trainer import read_metrics
    on_all_devices = {"mesh": {"data": 1, "fsdp": -1, "tensor": 1}, "global_batch": 8}  # in-process: 8 devices
    assert train_cli.main(_job(tmp_path / "a", corpus, **on_all_devices)[2:]) == 0
    cmd = _job(tmp_path / "b", corpus, **on_all_devices)[2:]
    real_save = ocp.CheckpointManager.save

    def full_disk(self, step, *args, **kwargs):
        if step == 8:
            raise ValueError('RESOURCE_EXHAUSTED: Error writing "params.lm_head/0.0" in OCDBT database at local '
                             'file "checkpoints/8.orbax-checkpoint-tmp/": Failed to write 4096 bytes to file 5')
        return real_save(self, step, *args, **kwargs)
    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    capsys.readouterr()
    assert train_cli.main(cmd) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    folder = tmp_path / "b" / "run" / "checkpoints"
    assert len(err) == 1 and err[0].startswith(f"error: {folder}: no space left on the device while writing the "
                                               f"checkpoint of step 8"), err
    assert "the last complete checkpoint is step 4" in err[0]
    assert sorted(p.name for p in folder.iterdir() if p.name.isdigit()) == ["4"]
    monkeypatch.undo()
    assert train_cli.main(cmd) == 0
    assert "resumed from its checkpoint of step 4" in capsys.readouterr().err
    pick = lambda run: [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]  # noqa: E731
    assert pick(tmp_path / "b" / "run") == pick(tmp_path / "a" / "run")


@pytest.mark.slow
def test_a_truncated_checkpoint_is_one_warning_line(tmp_path, corpus):
    """train.py on a run whose newest checkpoint lost half of its biggest file: one warning line
    naming it (no TensorStore spec, no event-loop traceback), resumed from the one before."""
    cmd = _job(tmp_path, corpus, steps=8)
    assert subprocess.run(cmd, capture_output=True, env=ENV, timeout=300).returncode == 0
    folder = tmp_path / "run" / "checkpoints"
    biggest = max((f for f in (folder / "8").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    shutil.rmtree(tmp_path / "run" / "final")
    run = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    warnings = [line for line in run.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: checkpoint {folder / '8'} cannot be read ("), warnings
    assert f"moved to {folder / 'damaged-8'}" in warnings[0]
    for noise in ("Traceback", "Event loop is closed", "'driver'", "TensorStore"):
        assert noise not in run.stderr, noise
    assert "resumed from its checkpoint of step 4" in run.stderr


def test_an_abandoned_orbax_read_logged_by_asyncio_is_dropped_and_nothing_else():
    """asyncio logs a never-retrieved task exception when the task is collected: one of orbax's
    reads that a failed restore abandoned is dropped (it once printed a traceback after the one
    warning line, in CI); any other task's exception is kept."""
    import logging
    from solarjax.weights.checkpoint import drop_orbax_leftovers

    def record_of(filename):
        code = compile("raise ValueError('read failed')", filename, "exec")
        try:
            exec(code)
        except ValueError:
            info = sys.exc_info()
        return logging.LogRecord("asyncio", logging.ERROR, "x", 1, "Task exception was never retrieved", (), info)
    drop_orbax_leftovers()
    log = logging.getLogger("asyncio")
    assert not log.filter(record_of("/venv/site-packages/orbax/checkpoint/_src/serialization/serialization.py"))
    assert log.filter(record_of("/work/somebody_elses_code.py"))


def test_a_cpu_only_host_starts_without_libtpu_noise():
    """With libtpu installed (the tpu extra) jax tries the TPU backend, and libtpu printed a dozen
    warning lines before the CPU took over; importing solarjax on a host with nothing but a CPU
    names the CPU first. Where a TPU or GPU is present, nothing is changed."""
    import solarjax
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = "import solarjax, jax, os; print(jax.devices()[0].platform, os.environ.get('JAX_PLATFORMS'))"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    if solarjax._only_a_cpu_here():
        assert run.stdout.split() == ["cpu", "cpu"] and "TPU" not in run.stderr, run.stderr
    else:  # an accelerator host: JAX_PLATFORMS left to jax
        assert run.stdout.split()[1] == "None"
