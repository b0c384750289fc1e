"""The report and plot of a run: status, sizes, speed, honest times of a resumed run, warnings,
generation samples before -> after, the learning-rate curve and the marks at best and resume."""
import json

import pytest

from conftest_train import instruction_rows, job, sentiment_rows, tiny_bert, tiny_llama, write_jsonl  # noqa: F401
from slimtune.train.run import run_train


def test_resumed_lm_run_reports_sessions_samples_and_marks(tiny_llama, tmp_path):
    from slimtune.train import trainer as T
    from slimtune.train.report import figure

    write_jsonl(tmp_path / "d.jsonl", instruction_rows(40))
    data = {"train": str(tmp_path / "d.jsonl")}
    tr = {"max_steps": 8, "eval_every": 2, "save_every": 2, "log_every": 1, "lr": 1e-2}
    orig = T.Trainer.save_checkpoint

    def kill_after(self):
        path = orig(self)
        if self.step == 4:
            raise KeyboardInterrupt  # an abrupt stop right after the step-4 checkpoint
        return path
    T.Trainer.save_checkpoint = kill_after
    try:
        with pytest.raises(KeyboardInterrupt):
            run_train(job(tiny_llama, tmp_path / "run", data, train=tr), log=lambda *_: None, progress=False)
    finally:
        T.Trainer.save_checkpoint = orig
    logs: list[str] = []
    res = run_train(job(tiny_llama, tmp_path / "run", data, train=tr, resume=True), log=logs.append, progress=False)
    assert any(x.startswith("step 5/8: loss") for x in logs), logs  # no progress bar: the log has the loss
    assert res["resumed_at"] == 4 and len(res["sessions"]) == 2 and res["resume_steps"] == [4]
    assert res["step_time_s"] > 0 and res["tokens_per_s"] > 0
    assert res["train_time_s"] >= res["session_train_s"] and res["sessions"][0]["end_step"] == 4
    report = (tmp_path / "run/report.md").read_text()
    assert report.startswith("# run: ") and "**Finished**: 8 of 8 steps." in report
    assert "36 train / 4 validation examples" in report and "s per step this session" in report
    assert "over the run's 2 sessions" in report and "resumed at step 4 from its checkpoint" in report
    assert "## Generations: before -> after training" in report and "| prompt (end) | reference | before | after |" in report
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert len(summary["samples_before"]) == 3 and len(summary["samples_after"]) == 3
    fig = figure(res["trainer"].history, res["metric"], res, "the title")
    labels = fig.axes[0].get_legend().get_texts()
    names = [t.get_text() for t in labels]
    assert "learning rate" in names and "resumed" in names and f"best (step {res['best_step']})" in names
    assert fig._suptitle.get_text() == "the title"


def test_no_better_than_untrained_is_warned(tiny_bert, tmp_path):
    write_jsonl(tmp_path / "s.jsonl", sentiment_rows(40))
    logs: list[str] = []
    res = run_train(job(tiny_bert, tmp_path / "run", {"train": str(tmp_path / "s.jsonl")}, train={"lr": 1e-9}),
                    log=logs.append, progress=False)
    warn = [w for w in res["warnings"] if "no better than the model before training" in w]
    assert warn and any("no better than the model before training" in x for x in logs)
    report = (tmp_path / "run/report.md").read_text()
    assert "## Warnings" in report and warn[0] in report
    assert "validation has 4 example(s): accuracy moves in steps of 0.25" in report  # named before training


def test_truncation_of_most_examples_is_named(tiny_llama, tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"text": "word " * 60} for _ in range(20)])
    logs: list[str] = []
    run_train(job(tiny_llama, tmp_path / "run", {"train": str(tmp_path / "t.jsonl"), "max_length": 16}),
              log=logs.append, progress=False)
    w = [x for x in logs if x.startswith("warning: truncation cuts 20 of 20 examples (100%)")]
    assert w and "raise data.max_length (e.g. 62)" in w[0], logs
