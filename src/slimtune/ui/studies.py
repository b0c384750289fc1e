"""`slimtune compare` and `slimtune search` folders: their tables, reports and plots.

A compare folder holds compare.md / compare.csv / compare.png; a search folder holds its Optuna study
(study.db), read here through Optuna's own API (read-only: no table is created or migrated) into a
trials table and Optuna's plotly figures, next to search.md and plots/*.png.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from . import runs

MARKS = {"compare": "compare.csv", "search": "study.db"}


def find(root: Path) -> list[dict[str, Any]]:
    found = []
    seen: set[Path] = set()

    def walk(p: Path, depth: int) -> None:
        if not runs.first_visit(root, p, seen):  # nothing outside the runs folder (links not followed out)
            return
        kinds = [k for k, f in MARKS.items() if (p / f).is_file()]
        if kinds:
            found.append({"name": runs.name(root, p), "kind": kinds[0]})
        if depth >= runs.MAX_DEPTH:
            return
        try:
            kids = sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))
        except OSError:
            return
        for c in kids:
            walk(c, depth + 1)

    walk(root, 0)
    return found


def _text(p: Path, limit: int = 200_000) -> str | None:
    try:
        return p.read_text(errors="replace")[:limit]
    except OSError:
        return None


def _csv(p: Path) -> list[dict[str, str]]:
    t = _text(p)
    if not t:
        return []
    try:
        return list(csv.DictReader(io.StringIO(t)))[:500]
    except csv.Error:
        return []


def study(db: Path) -> dict[str, Any]:
    """Every study in an Optuna SQLite file: trials and figures (plotly JSON), or the error that stopped it."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///file:{db.resolve()}?mode=ro&uri=true",
                                             skip_compatibility_check=True, skip_table_creation=True)
        out = []
        for s in optuna.study.get_all_study_summaries(storage):
            st = optuna.load_study(study_name=s.study_name, storage=storage)
            trials = [{"number": t.number, "state": t.state.name, "values": t.values, "params": t.params,
                       "duration_s": t.duration.total_seconds() if t.duration else None}
                      for t in st.get_trials(deepcopy=False)]
            figs = {}
            done = [t for t in st.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
            if done:
                from optuna import visualization as vis

                try:
                    multi = len(st.directions) > 1
                    figs["history" if not multi else "pareto"] = (vis.plot_pareto_front(st) if multi else
                                                                  vis.plot_optimization_history(st)).to_json()
                    if len(done) > 1 and not multi and done[0].params:
                        figs["slice"] = vis.plot_slice(st).to_json()
                except (ValueError, RuntimeError, ImportError) as e:  # a study optuna cannot plot
                    figs["error"] = str(e)
            out.append({"study": s.study_name, "directions": [d.name for d in st.directions], "trials": trials,
                        "figures": figs})
        return {"studies": out}
    except Exception as e:  # noqa: BLE001 - a study being written or corrupt must not break the page
        return {"studies": [], "error": f"{type(e).__name__}: {e}"[:500]}


def detail(root: Path, folder: Path) -> dict[str, Any]:
    d: dict[str, Any] = {"name": runs.name(root, folder)}
    if (folder / "compare.csv").is_file():
        d.update(kind="compare", table=_csv(folder / "compare.csv"), report=_text(folder / "compare.md"),
                 images=[runs.name(root, folder / "compare.png")] if (folder / "compare.png").is_file() else [])
    else:
        d.update(kind="search", table=_csv(folder / "search.csv"), report=_text(folder / "search.md"),
                 images=[runs.name(root, p) for p in sorted((folder / "plots").glob("*.png"))[:20]])
        d.update(study(folder / "study.db"))
    return d
