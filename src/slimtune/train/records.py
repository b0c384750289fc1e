"""What a run leaves behind as it goes: metrics.jsonl / metrics.csv, the trackers' records, its
sessions, and the result dict `train()` returns (steps, times on both clocks, before / after, the
learning-rate curve). A mixin of trainer.Trainer, apart from the loop that produces them."""
from __future__ import annotations

import csv
import json
import time
from typing import Any

from .resources import peak_memory_mb


class RunRecords:
    """Trainer's records (reads its history, step, clocks, sessions, out, trackers)."""

    def _session(self) -> dict[str, Any]:
        return {"start_step": self.resumed_at or 0, "end_step": self.step, "wall_s": time.time() - self.session_t0,
                "train_s": self._session_train}

    def _record(self, rec: dict[str, Any]) -> None:
        self.history.append(rec)
        if not self.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.trackers is not None:
            self.trackers.log(rec)

    def _write_csv(self) -> None:
        keys: list[str] = []
        for r in self.history:
            keys += [k for k in r if k not in keys]
        with open(self.out / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.history)

    def _logged_steps(self) -> int:
        """The last step metrics.jsonl recorded (a killed session may have gone past its checkpoint)."""
        last = 0
        try:
            for line in (self.out / "metrics.jsonl").read_text().splitlines():
                try:
                    last = max(last, int(json.loads(line).get("step", 0)))
                except (ValueError, AttributeError, TypeError):
                    continue  # a line cut by the kill
        except OSError:
            pass
        return last

    def _result(self, status: str, wall: float) -> dict[str, Any]:
        sess = self.sessions + [self._session()]
        steps_here = self.step - (self.resumed_at or 0)
        return {"status": status, "signal": self.stop.name if self.stop and self.stop.requested else None,
                "steps": self.step, "total_steps": self.total_steps, "warmup_steps": self.warmup,
                "stopped_early": status == "stopped early", "before": self.before, "after": self.history_last_eval(),
                "best": self.best, "best_step": self.best_step, "metric": self.metric, "wall_s": wall,
                "train_time_s": self.train_time, "peak_mem_mb": peak_memory_mb(), "tokens": self.tokens_seen,
                "session_steps": steps_here, "session_train_s": self._session_train,
                "step_time_s": self._session_train / steps_here if steps_here else None,
                "session_cpu_s": self._session_cpu,
                "step_cpu_s": self._session_cpu / steps_here if steps_here else None,
                "first_step_s": self._first_step[0] if self._first_step else None,
                "first_step_cpu_s": self._first_step[1] if self._first_step else None,
                "tokens_per_s": self.tokens_seen / self.train_time if self.train_time else None,
                "resumed_at": self.resumed_at, "lost_steps": self.lost_steps, "sessions": sess,
                "elapsed_before_s": self.elapsed, "last_checkpoint": str(self.last_ckpt) if self.last_ckpt else None,
                "samples_before": self.samples_before, "samples_after": self.samples_after,
                "resume_steps": [x["start_step"] for x in sess if x["start_step"]], "lr_curve": self.lr_curve(),
                "stop_reason": self.stop_reason,
                "method_report": self._method_report() if self._method_report is not None else None}

    def history_last_eval(self) -> dict[str, float] | None:
        for r in reversed(self.history):
            if ("eval_loss" in r or self.metric in r) and r["step"] > 0:
                return {k: v for k, v in r.items() if k != "step"}
        return None

    def _finish_logs(self) -> None:
        if not self.is_main:
            return
        self._write_csv()
        if self.trackers is not None:
            self.trackers.flush()
