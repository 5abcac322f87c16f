"""A run: one surgery job executing in its own run directory, in this process or detached in its own.

    RUN_DIR/run.json       what to run: model reference and identity, the job, the session to keep honest
    RUN_DIR/events.jsonl   the one record of its progress (engine.eventlog)
    RUN_DIR/runner.lock    held (flock) by the runner while it is alive: a reader tells live from dead
    RUN_DIR/cancel         present: stop at the next step boundary, keep a resumable state
    RUN_DIR/runner.log     a detached runner's stdout and stderr

`execute` runs a job in this process (tests, scripting, `operate` without --detach); `spawn` starts
`python -m engine.runner RUN_DIR` in a new process session, so it survives the terminal that started it.
Both write the same files, and every viewer (the workbench, `runs`, `attach`) reads only them.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .atomic import atomic_write_text
from .errors import HeadSurgeonError, InputError
from .eventlog import LOG_FILE, EventLog, records_from_the_end
from .runview import CONTROL_PREFIX

RUN_FILE = "run.json"
LOCK_FILE = "runner.lock"
CANCEL_FILE = "cancel"
RUNNER_LOG = "runner.log"
RUN_FORMAT = "head-surgeon-run"


@dataclass
class RunSpec:
    """What a runner needs to execute a job without asking anyone: written once into run.json."""

    model: dict[str, Any]  # ref, revision, device, dtype: how to load the base model
    identity: dict[str, Any]  # engine.model.model_identity of that base: checked after loading
    job: dict[str, Any]  # SurgeryJob.to_dict()
    session: str | None = None  # absolute path of the session this run keeps up to date
    created: float = 0.0

    def save(self, run_dir: Path) -> None:
        data = {"format": RUN_FORMAT, "model": self.model, "identity": self.identity, "job": self.job,
                "session": self.session, "created": self.created or time.time()}
        atomic_write_text(run_dir / RUN_FILE, json.dumps(data, indent=1, allow_nan=False))

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunSpec":
        path = Path(run_dir) / RUN_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != RUN_FORMAT:
                raise ValueError("not a run file")
            return cls(data["model"], data["identity"], data["job"], data.get("session"), float(data["created"]))
        except FileNotFoundError:
            raise InputError(f"{run_dir} is not a run directory (no {RUN_FILE}): pass one that `runs` lists") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{path} is damaged or from another version ({exc}); the directory was left as it is") from exc


# --- liveness ---------------------------------------------------------------------------------------
class RunLock:
    """An exclusive flock on RUN_DIR/runner.lock, released when the holder exits, however it exits."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, wait_s: float = 2.0) -> bool:
        """Take the lock; False if another process holds it after `wait_s` (a reader's brief probe
        with `is_live` is waited out)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                if time.monotonic() > deadline:
                    os.close(fd)
                    return False
                time.sleep(0.01)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return True

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def is_live(run_dir: str | Path) -> bool:
    """True while some process holds the run's lock."""
    path = Path(run_dir) / LOCK_FILE
    if not path.exists():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


@dataclass
class RunStatus:
    """What `runs` lists and the workbench shows about a run, read from its files alone."""

    run_dir: Path
    state: str  # running | finished | cancelled | failed | dead (| damaged: unreadable files)
    step: int
    total_steps: int
    targets: str
    heldout_ppl: float | None
    model: str
    created: float
    message: str = ""  # why it failed


def run_state(run_dir: str | Path) -> RunStatus:
    """The state of a run from its lock and event log; a runner that vanished mid-run reads as dead."""
    run_dir = Path(run_dir)
    spec = RunSpec.load(run_dir)
    live = is_live(run_dir)
    step = total = ppl = terminal = None
    decided, message = False, ""
    log = run_dir / LOG_FILE
    for r in records_from_the_end(log) if log.is_file() else ():  # newest first, only as far as needed
        kind = r.get("kind")
        if not decided and kind in ("finished", "failed", "started"):  # the last of these decides the outcome
            decided = True
            if kind != "started":
                terminal, message = r, r.get("message", "")
        if kind == "step":
            step = r["step"] if step is None else step
            total = r["total_steps"] if total is None else total
        elif kind == "resumed" and step is None:
            step = r["step"]
        elif kind == "eval" and ppl is None and r.get("heldout_ppl") is not None \
                and not str(r.get("label", "")).startswith(CONTROL_PREFIX):  # the surgery's, not its control's
            ppl = r["heldout_ppl"]
        if decided and None not in (step, total, ppl):
            break
    step, total = step or 0, total or 0
    if live:
        state = "running"
    elif terminal is None:
        state = "dead"
    elif terminal["kind"] == "failed":
        state = "failed"
    else:
        state = "cancelled" if terminal.get("cancelled") else "finished"
    targets = ",".join(p.get("targets", "") for p in spec.job.get("plans", []))
    return RunStatus(run_dir, state, step, total, targets, ppl, str(spec.identity.get("ref", spec.model.get("ref"))),
                     spec.created, message)


def list_runs(root: str | Path) -> list[RunStatus]:
    """Every run directory directly under `root`, oldest first; one that cannot be read is `damaged`."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = []
    for d in root.iterdir():
        if (d / RUN_FILE).is_file():
            try:
                runs.append(run_state(d))
            except (InputError, OSError, KeyError, TypeError, ValueError) as exc:
                runs.append(RunStatus(d, "damaged", 0, 0, "", None, "?", 0.0, str(exc).splitlines()[0][:200]))
    return sorted(runs, key=lambda r: r.created)


def cancel(run_dir: str | Path) -> str:
    """Ask a live runner to stop at its next step boundary; a one-line refusal for any other run."""
    status = run_state(run_dir)
    if status.state != "running":
        fix = {"dead": f": continue it with head-surgeon resume {run_dir}",
               "cancelled": f": continue it with head-surgeon resume {run_dir}"}.get(status.state, "")
        raise InputError(f"run {run_dir} is {status.state}; there is nothing to cancel{fix}")
    (Path(run_dir) / CANCEL_FILE).touch()
    return f"asked run {run_dir} to stop at its next step (it keeps a resumable state)"


# --- executing ---------------------------------------------------------------------------------------
class _Tracker:
    """Remembers the last step and whether a terminal event was already logged."""

    def __init__(self) -> None:
        self.step, self.terminal = 0, False

    def emit(self, event) -> None:
        if event.kind in ("step", "resumed"):
            self.step = event.step
        self.terminal = self.terminal or event.kind in ("finished", "failed")


def _update_session(spec: RunSpec, run_dir: Path, status: str) -> None:
    """Best effort (a full disk may refuse it): readers take the state from the run itself (`session_state`).
    Only a session that still names this run is touched."""
    from .session import Session

    if spec.session and Path(spec.session).is_file():
        try:
            session = Session.load(spec.session)
            if session.run_path() != run_dir.resolve():
                return
            session.status = status
            session.save()
        except HeadSurgeonError:
            pass


def session_state(session) -> str:
    """A session's honest status: its run's state when it has one (a runner killed mid-run: `interrupted`)."""
    run = session.run_path()
    if run is None or not (run / RUN_FILE).is_file():
        return session.status
    state = run_state(run).state
    return "interrupted" if state == "dead" else state


def execute(run_dir: str | Path, *, resume: bool = False, loaded=None, baseline=None, sink=None,
            cancelled: Callable[[], bool] = lambda: False, lock: RunLock | None = None) -> dict[str, Any]:
    """Run (or, with `resume`, continue) the job in `run_dir` in this process and return its report.

    `loaded` may hand over a freshly loaded, unmodified base model (it must match the run's identity);
    otherwise the runner loads it. Every event goes to the run's log and to `sink`. `lock`: the run's
    lock, already held by the caller."""
    from .distributed import world
    from .events import MultiSink, RunFailed, RunStarted
    from .model import check_identity
    from .operation import SurgeryJob, run_job

    run_dir = Path(run_dir)
    spec = RunSpec.load(run_dir)
    if not world().main:
        return _follow(run_dir, spec, resume=resume, loaded=loaded, baseline=baseline, cancelled=cancelled)
    lock = lock or RunLock(run_dir)
    if not lock.held and not lock.acquire():
        raise InputError(f"run {run_dir} is already running in another process: attach to it or cancel it")
    cancel_file = run_dir / CANCEL_FILE  # cleared by whoever starts a segment (`workflow.start`), not here:
    try:                                  # a cancel sent while this runner was starting must count
        tracker = _Tracker()
        with EventLog(run_dir) as log:
            events = MultiSink(log, tracker, sink)
            events.emit(RunStarted(os.getpid(), resume))
            _update_session(spec, run_dir, "running")
            status = "failed"
            try:
                loaded = loaded or _load_base(spec)
                check_identity(spec.identity, loaded, f"run {run_dir}")
                job = SurgeryJob.from_dict(spec.job, loaded.adapter)
                report = run_job(loaded, job, run_dir, sink=events, baseline=None if resume else baseline,
                                 resume=resume, cancelled=lambda: cancelled() or cancel_file.exists())
                status = "cancelled" if report.get("cancelled") else "finished"
                return report
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt):
                    status = "interrupted"
                elif not tracker.terminal:
                    try:
                        events.emit(RunFailed(tracker.step, _one_line(exc)))
                    except HeadSurgeonError:
                        pass  # the log itself cannot be written (a full disk): the error below still says why
                raise
            finally:
                _update_session(spec, run_dir, status)
    finally:
        cancel_file.unlink(missing_ok=True)  # consumed (or moot): the next segment starts clean
        lock.release()


def _load_base(spec: RunSpec):
    from .distributed import world
    from .model import load_model

    m = spec.model
    device = m.get("device")
    if world().active and device and device.startswith("cuda"):
        device = "cuda"  # each rank on its own GPU
    return load_model(m.get("ref"), device=device, dtype=m.get("dtype"), revision=m.get("revision"))


def _follow(run_dir: Path, spec: RunSpec, *, resume: bool, loaded, baseline, cancelled) -> dict[str, Any]:
    """A rank other than 0 of a distributed run: the same job in step with rank 0, which alone holds the lock
    and writes the events, the files and the session."""
    from .model import check_identity
    from .operation import SurgeryJob, run_job

    loaded = loaded or _load_base(spec)
    check_identity(spec.identity, loaded, f"run {run_dir}")
    job = SurgeryJob.from_dict(spec.job, loaded.adapter)
    cancel_file = run_dir / CANCEL_FILE
    return run_job(loaded, job, run_dir, baseline=None if resume else baseline, resume=resume,
                   cancelled=lambda: cancelled() or cancel_file.exists())


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, HeadSurgeonError):
        return str(exc)
    first = (str(exc).strip().splitlines() or [""])[0]
    if "out of memory" in first.lower():
        return ("out of memory: use a smaller seq len or micro-batch, a smaller prefix cache (prefix cache GB, 0 "
                "turns it off), or a smaller model")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def spawn(run_dir: str | Path, *, resume: bool = False, wait_s: float = 60.0) -> int:
    """Start a detached runner for `run_dir` (own process session: it outlives the terminal and a hangup)
    and return its pid once it holds the run's lock."""
    run_dir = Path(run_dir).resolve()
    if is_live(run_dir):
        raise InputError(f"run {run_dir} is already running: attach to it or cancel it")
    (run_dir / CANCEL_FILE).unlink(missing_ok=True)  # a cancel meant for an earlier segment
    spec = RunSpec.load(run_dir)
    nproc = int(spec.model.get("nproc") or 1)
    launcher = torchrun_command(nproc) if nproc > 1 else [sys.executable]  # torchrun starts one runner a rank
    cmd = [*launcher, "-m", "engine.runner", str(run_dir)] + (["--resume"] if resume else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    root = str(Path(__file__).resolve().parents[1])  # the engine importable from anywhere
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    with open(run_dir / RUNNER_LOG, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env, close_fds=True)
    deadline = time.monotonic() + wait_s
    while not is_live(run_dir):
        if proc.poll() is not None:
            tail = (run_dir / RUNNER_LOG).read_text(errors="replace").strip().splitlines()
            raise InputError(f"the runner for {run_dir} exited at once: {tail[-1] if tail else 'no output'}")
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return proc.pid


def torchrun_command(nproc: int) -> list[str]:
    """The launcher of a run over `nproc` processes on this host: PyTorch's torchrun, standalone (its own
    rendezvous on a free port); it is followed by `-m MODULE ARGS`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]


def main(argv: list[str] | None = None) -> int:
    """`python -m engine.runner RUN_DIR [--resume]`: the detached runner's entry point (one per rank under
    torchrun: rank 0 holds the lock and writes; the others follow it)."""
    argv = sys.argv[1:] if argv is None else argv
    run_dir, resume = Path(argv[0]), "--resume" in argv[1:]
    lock = RunLock(run_dir)
    if os.environ.get("RANK", "0") == "0" and not lock.acquire():  # before the heavy imports: live at once
        print(f"runner: {run_dir} is already running", file=sys.stderr)
        return 2
    # SIGTERM stops at the next step boundary like `cancel`; a hangup of the starting shell changes nothing.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    from .runtime import allocator_defaults, quiet_libraries

    quiet_libraries()
    allocator_defaults()
    from .distributed import init_from_env, shutdown

    ended = False
    try:
        init_from_env(RunSpec.load(run_dir).model.get("device"))
        execute(run_dir, resume=resume, cancelled=stop.is_set, lock=lock)
        ended = True  # finished or cancelled: every rank got here together
    except HeadSurgeonError as exc:
        print(f"runner: error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown(together=ended)
    return 0


if __name__ == "__main__":
    sys.exit(main())
