"""Stop in `slimtune ui` is SIGINT to the run it started. A page started with SIGINT ignored (nohup, a
script's `&` job) passes SIG_IGN on to its children through exec, and the job keeps an ignored SIGINT
on purpose; the run the page starts must still answer Stop."""
import signal
import subprocess
import sys
import textwrap
import time

import pytest


def _child(code: str, env_flag: bool) -> subprocess.CompletedProcess:
    """A real process that starts with SIGINT ignored (as under nohup), runs slimtune's CLI entry
    point's signal set-up, then sends itself SIGINT: exit 130 = it answered Ctrl-C, 0 = ignored."""
    import os

    env = dict(os.environ)
    env.pop("SLIMTUNE_ANSWER_CTRL_C", None)
    if env_flag:
        env["SLIMTUNE_ANSWER_CTRL_C"] = "1"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))


CODE = textwrap.dedent("""
    import os, signal, sys
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # inherited, as under nohup
    from slimtune.cli.main import answer_ctrl_c
    answer_ctrl_c()
    assert "SLIMTUNE_ANSWER_CTRL_C" not in os.environ  # the run's own children keep the usual rule
    try:
        os.kill(os.getpid(), signal.SIGINT)
        import time; time.sleep(5)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(0)
""")


@pytest.mark.parametrize("flag,code", [(True, 130), (False, 0)])
def test_the_pages_flag_makes_an_ignored_ctrl_c_live_and_only_then(flag, code):
    r = _child(CODE, flag)
    assert r.returncode == code, r.stderr


def test_the_page_starts_runs_with_the_flag(tmp_path, monkeypatch):
    from slimtune.ui import jobs as J

    seen = {}

    class Recorder:
        def __init__(self, argv, **kw):
            seen.update(kw["env"])
            self.pid = 1

        def poll(self):
            return 0

    monkeypatch.setattr(J.subprocess, "Popen", Recorder)
    J.Jobs(tmp_path)._spawn(tmp_path / "run", [str(tmp_path / "run.yaml")])
    assert seen["SLIMTUNE_ANSWER_CTRL_C"] == "1"
