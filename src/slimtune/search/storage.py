"""Where a search's Optuna study lives, and how workers sharing it tell a dead one from a slow one.

    (no --storage)           OUT/study.db, SQLite: one machine; OUT's lock says no one else runs
    postgresql://U@H:P/DB    Optuna's RDB storage on a real server: workers on any machine that reaches it
    journal:PATH             Optuna's journal file (an append-only log with a file lock): a shared folder

Why a heartbeat: with several workers a trial still RUNNING in the store may be alive elsewhere, so
"RUNNING when I start" no longer means "cut off". Each worker records a heartbeat for its trial every
`interval` seconds; a RUNNING trial whose heartbeat is older than `grace` is failed by the next worker
that looks (`optuna.storages.fail_stale_trials`) and Optuna's retry callback queues a WAITING copy
with the same parameters, which exactly one worker then pops (the store's state change from WAITING
to RUNNING is atomic), so a killed worker's trial is re-run once and no trial runs twice.

Optuna's RDB storage has the heartbeat built in; its journal storage does not, so `JournalHeartbeat`
adds it the same way (the heartbeat is a system attribute of the trial, written to the same log).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .space import SearchError

# schemes a --storage URL may have; anything else is refused with these named
RDB_SCHEMES = ("postgresql", "postgresql+psycopg", "postgresql+psycopg2", "sqlite")
JOURNAL_PREFIX = "journal:"
HEARTBEAT_ATTR = "slimtune:heartbeat"


@dataclass(frozen=True)
class StorageSpec:
    """A parsed --storage: its kind ('sqlite-local', 'rdb' or 'journal'), its URL or path, and what
    to print (the URL without a password)."""
    kind: str
    target: str
    shown: str

    @property
    def shared(self) -> bool:
        return self.kind != "sqlite-local"


def parse(url: Optional[str], out: Path) -> StorageSpec:
    """--storage as given (None: OUT/study.db); refuses a scheme no worker could open, naming the forms."""
    if url is None:
        return StorageSpec("sqlite-local", f"sqlite:///{(out / 'study.db').resolve()}", f"{out}/study.db")
    if url.startswith(JOURNAL_PREFIX):
        path = url[len(JOURNAL_PREFIX):]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise SearchError(f"--storage {url!r}: give the journal file's path, e.g. journal:/shared/search.log")
        p = Path(path).expanduser()
        if p.is_dir():
            raise SearchError(f"--storage {url!r} is a folder; name a file in it, e.g. journal:{p / 'search.log'}")
        return StorageSpec("journal", str(p.resolve()), f"journal:{p}")
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme == "postgres":
        raise SearchError(f"--storage {_hide(url)!r}: write the scheme as postgresql:// (SQLAlchemy does not "
                          "accept postgres://), e.g. postgresql://USER:PASSWORD@HOST:5432/DB")
    if scheme not in RDB_SCHEMES:
        raise SearchError(f"--storage {_hide(url)!r}: unknown storage; give postgresql://USER:PASSWORD@HOST:PORT/DB "
                          "(a PostgreSQL server every worker reaches), journal:PATH (a file in a folder every worker "
                          "shares) or sqlite:///PATH (one machine)")
    if scheme.startswith("postgresql"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            try:
                import psycopg2  # noqa: F401
            except ImportError:
                raise SearchError("--storage postgresql://... needs a PostgreSQL driver: pip install 'psycopg[binary]' "
                                  "(or pip install 'slimtune[search]')") from None
            else:
                url = url.replace("postgresql://", "postgresql+psycopg2://", 1)
        else:
            url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    return StorageSpec("rdb", url, _hide(url))


def _hide(url: str) -> str:
    """The URL with its password masked, for messages and reports."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy parses: show it as given
        return url


def retry_callback(optuna):
    """Optuna's own: a stale trial is queued again (WAITING) with its parameters, its number kept in
    the copy's system attributes (`failed_trial`, `retry_history`)."""
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    return cls(max_retry=3)


def open_storage(optuna, spec: StorageSpec, heartbeat_s: Optional[int]) -> Any:
    """The Optuna storage for `spec`, heartbeats every `heartbeat_s` (None: off) with a grace of three
    beats; an unreachable server or a database that is not Optuna's is one message with the fix."""
    grace = None if heartbeat_s is None else 3 * heartbeat_s
    if spec.kind == "journal":
        Path(spec.target).parent.mkdir(parents=True, exist_ok=True)
        try:
            backend = optuna.storages.journal.JournalFileBackend(spec.target)
        except OSError as e:
            raise SearchError(f"--storage {spec.shown}: cannot open the journal file ({e.strerror}); give a path in a "
                              "folder this machine can write") from None
        return _journal_class(optuna)(backend, heartbeat_s, grace, retry_callback(optuna))
    kw: dict[str, Any] = {"engine_kwargs": {"connect_args": {"timeout": 60}}}
    if spec.kind == "rdb" and spec.target.startswith("postgresql"):
        kw["engine_kwargs"] = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    if heartbeat_s is not None:
        cb_kw = ("heartbeat_stale_trial_callback" if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
                 else "failed_trial_callback")
        kw.update(heartbeat_interval=heartbeat_s, grace_period=grace, **{cb_kw: retry_callback(optuna)})
    try:
        return optuna.storages.RDBStorage(spec.target, **kw)
    except Exception as e:  # noqa: BLE001 - SQLAlchemy / driver / Optuna schema errors: one message each
        raise SearchError(_rdb_message(spec, e)) from None


def _rdb_message(spec: StorageSpec, e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    low = str(e).lower()
    if "current schema version" in low or "alembic" in low or "upgrade" in low:
        return (f"--storage {spec.shown}: the database holds Optuna tables of another version ({text[:200]}); run "
                f"`optuna storage upgrade --storage URL` or give an empty database")
    if any(k in low for k in ("connection refused", "could not connect", "timeout expired", "could not translate",
                              "name or service not known", "connection failed", "no such host")):
        return (f"--storage {spec.shown}: cannot reach the server ({text[:200]}); start it, or fix the host and port "
                "(every worker must reach the same server)")
    if "does not exist" in low or "authentication failed" in low or "password" in low:
        return (f"--storage {spec.shown}: the server refused ({text[:200]}); create the database and user first "
                "(createdb / createuser) or fix the name and password in the URL")
    if "relation" in low or "no such table" in low or "column" in low:
        return (f"--storage {spec.shown}: the database has tables that are not an Optuna study's ({text[:200]}); "
                "give an empty database or one that Optuna created")
    return f"--storage {spec.shown}: cannot open the study storage ({text[:300]})"


def _journal_class(optuna):
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.trial import TrialState

    class JournalHeartbeat(optuna.storages.JournalStorage, BaseHeartbeat):
        """Optuna's journal storage with the heartbeat its RDB storage has: the beat is a trial system
        attribute (time.time(), so the workers' clocks must agree within the grace period)."""

        def __init__(self, backend, interval: Optional[int], grace: Optional[int], callback) -> None:
            super().__init__(backend)
            self._interval, self._grace, self._callback = interval, grace, callback

        def record_heartbeat(self, trial_id: int) -> None:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            assert self._grace is not None
            now = time.time()
            stale = []
            for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
                beat = t.system_attrs.get(HEARTBEAT_ATTR)
                if beat is None and t.datetime_start is not None:
                    beat = t.datetime_start.timestamp()
                if beat is not None and now - beat > self._grace:
                    stale.append(t._trial_id)
            return stale

        def get_heartbeat_interval(self) -> Optional[int]:
            return self._interval

        def get_heartbeat_stale_trial_callback(self):
            return self._callback

        def get_failed_trial_callback(self):  # the name before Optuna 4.9
            return self._callback

    return JournalHeartbeat


class Heartbeat:
    """Beats for one trial from a thread while it trains. A beat that fails (the server went away)
    sets `lost`; the trainer's evaluation callback sees it and stops the trial, which the store then
    finds stale and queues again once it is back."""

    def __init__(self, storage, trial_id: int, interval: Optional[int]) -> None:
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "Heartbeat":
        if self.interval is not None:
            self._thread = threading.Thread(target=self._run, name="slimtune-heartbeat", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as e:  # noqa: BLE001 - the store is unreachable: say so once and stop beating
                self.lost = first_line(e)
                return
            if self._stop.wait(self.interval):
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def errors(optuna, journal: bool = False) -> tuple[type[BaseException], ...]:
    """What a store that went away raises: Optuna's wrapper, SQLAlchemy's (its driver's inside), and
    for a journal file on a shared folder that vanished, the OS's."""
    from sqlalchemy.exc import SQLAlchemyError

    return (optuna.exceptions.StorageInternalError, SQLAlchemyError) + ((OSError,) if journal else ())


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def fail_stale(optuna, study) -> None:
    """Fail the trials whose worker stopped beating, queueing each again (no-op without a heartbeat)."""
    optuna.storages.fail_stale_trials(study)


def retried_numbers(trials) -> set[int]:
    """Numbers of the failed trials that were queued again by the retry callback: they do not count."""
    done: set[int] = set()
    for t in trials:
        done.update(t.system_attrs.get("retry_history") or [])
    return done

