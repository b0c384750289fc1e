"""`slimtune eval [RUN|CONFIG]`: held-out metrics of a model, with a run's best adapter or without one."""
from __future__ import annotations

HELP = "measure a model (+ adapter) on a config's held-out data"


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help=HELP,
                       description="Evaluate on the held-out split of a config's data. TARGET is a run folder "
                       "(uses its config.yaml and best adapter) or a YAML config; none: the default config.")
    e.add_argument("target", nargs="?", help="run folder or YAML config")
    e.add_argument("overrides", nargs="*", help="key=value overrides")
    e.add_argument("--adapter", help="adapter folder (default: RUN/best); none for a YAML: the base model")
    e.add_argument("--out", help="scratch folder for eval outputs")
    e.set_defaults(fn=run)


def run(a) -> int:
    import tempfile

    import torch

    from .. import PeftModel, get_peft_model
    from ..train.job import setup
    from ..train.trainer import Trainer, _fmt
    from .common import adapter_folder, run_dir_config

    cfg, adapter = run_dir_config(a.target, list(a.overrides))
    adapter = adapter_folder(a.adapter) if a.adapter else adapter
    s = setup(cfg, print)
    if adapter:
        model = PeftModel.from_pretrained(s["model"], adapter, is_trainable=True)
        print(f"evaluating {cfg.model_name()} + adapter {adapter}")
    else:  # a fresh adapter is the identity (LoRA B = 0): this measures the base model
        torch.manual_seed(cfg.train.seed)
        model = get_peft_model(s["model"], s["adapter_config"])
        print(f"evaluating {cfg.model_name()} without a trained adapter (zero-shot)")
    tr = Trainer(cfg.model_copy(update={"output_dir": a.out or tempfile.gettempdir()}), model, s["tokenizer"],
                 s["data"], s["task"], progress=False)
    res = tr.evaluate()
    print(f"{s['data'].source}: {len(s['data'].eval)} held-out examples")
    print(_fmt(res))
    for smp in tr.sample_generations() or []:
        print(f"  reference {smp['reference']!r:30.60} generated {smp['generated']!r:.80}")
    return 0
