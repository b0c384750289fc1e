"""`slimtune ui`: a local web page over a folder of runs (start, watch, stop, resume, compare).

    runs.py      what a run folder holds and what state it is in (read-only, tolerant of half-written files)
    jobs.py      the new-run form's config (checked with the job's own checks) and the processes it starts
    studies.py   `slimtune compare` / `slimtune search` folders (the study through Optuna's API)
    app.py       the FastAPI app: JSON API + one static page (plotly.js served from the plotly package)

Everything the page can read is resolved under the runs folder first (`runs.inside`); the page never
reaches a shell: runs start as `python -m slimtune train FILE` argument lists. docs/ui.md.
"""
