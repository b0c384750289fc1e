"""`slimtune predict RUN|ADAPTER [INPUT|-] [--out FILE]`: a trained classifier's label + probability,
or an LM's generated answer, for every row of a file or of stdin."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import adapter_folder, is_run_folder, load_base, quiet_hf
from .errors import CommandError

HELP = "run a trained adapter on new rows: label + probability, or generated text (JSONL/CSV)"


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help=HELP,
                       description="Predict with a trained adapter. TARGET is a run folder (its best adapter, data "
                       "settings and label names) or an adapter folder. INPUT is a data file (.jsonl/.json/.csv/.tsv/"
                       ".txt/.parquet) or - for stdin (JSON lines, or one text per line); none reads stdin. "
                       "Classifiers add 'label' and 'probability' to each row; language models add 'generated'.")
    p.add_argument("target", help="run folder or adapter folder")
    p.add_argument("input", nargs="?", default="-", help="input file, or - for stdin (default)")
    p.add_argument("--out", help="output file (.csv for CSV, else JSON lines); default: stdout")
    p.add_argument("--format", choices=["jsonl", "csv"], help="output format (default: from --out, else jsonl)")
    p.add_argument("--model", help="base model (default: the adapter's base)")
    p.add_argument("--column", help="classifier input column (default: the run's data.text_column, else text)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64, help="language models: tokens to generate per row")
    p.add_argument("--temperature", type=float, default=0.0, help="language models: 0 = greedy")
    p.add_argument("--prompt", help="vision-language models: the question asked about each image (INPUT an image or "
                   "a folder of images)")
    p.set_defaults(fn=run)


def run(a) -> int:
    from .. import PeftModel
    from ..train import predict

    quiet_hf()
    if a.batch_size < 1 or a.max_new_tokens < 1:
        raise CommandError("--batch-size and --max-new-tokens must be at least 1")
    if a.input == "-" and sys.stdin.isatty():
        raise CommandError("no input: pass a file (slimtune predict RUN new.jsonl) or pipe rows into stdin")
    data_cfg, fmt = None, None
    if is_run_folder(a.target):
        from ..train.config import load_config

        data_cfg = load_config(str(Path(a.target) / "config.yaml")).data
        try:
            fmt = json.loads((Path(a.target) / "summary.json").read_text()).get("format")
        except (OSError, ValueError):
            fmt = None
    elif Path(a.target).is_dir() and not (Path(a.target) / "adapter_config.json").is_file():
        from .common import not_a_run

        raise not_a_run(a.target, "a run folder or an adapter folder")
    adapter = adapter_folder(a.target)
    spec = _task_of(adapter, a.model)
    rows = spec.read_inputs(a.input)  # read first: a bad file fails before the model loads
    model, tok, path, task = load_base(a.model, adapter)
    model = PeftModel.from_pretrained(model, adapter)
    try:
        out = spec.predict(model, tok, rows, {"adapter": adapter, "data_cfg": data_cfg, "fmt": fmt, "column": a.column,
                                              "batch_size": a.batch_size, "max_new_tokens": a.max_new_tokens,
                                              "temperature": a.temperature, "prompt": a.prompt})
    except NotImplementedError:
        raise CommandError(f"predict handles classifiers, image classifiers and language models; {adapter} is {task}") from None
    n = predict.write_outputs(out, a.out, a.format)
    print(f"predicted {n} row(s) with {adapter}" + (f" -> {a.out}" if a.out else ""), file=sys.stderr)
    return 0


def _task_of(adapter: str, model: str | None):
    """The adapter's task (train/tasks/): its PEFT task_type, else what its base model is (read only
    then: a packaged base is not converted before the inputs are checked)."""
    from ..train import models
    from ..train.tasks import all_tasks, task_for_adapter

    cfgj = json.loads((Path(adapter) / "adapter_config.json").read_text())
    tt = cfgj.get("task_type")
    if tt:
        spec = next((t for t in all_tasks().values() if t.peft_task_type == tt), None)
        if spec is None:
            raise CommandError(f"predict handles classifiers (SEQ_CLS), image classifiers and language models "
                               f"(CAUSAL_LM); {adapter} is {tt}")
        return spec
    base = model or cfgj.get("base_model_name_or_path") or ""
    try:
        path = models.resolve(base) if base else ""
    except models.ModelNotFound:
        path = base
    return task_for_adapter(None, path)
