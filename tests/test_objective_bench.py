"""examples/bench_dpo_vs_trl.py feeds TRL the rows in the order slimtune's trainer draws them: its
`order()` equals Trainer._examples over several epochs (the benchmark's "same batches")."""
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from slimtune.train.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("n,batch,steps,seed", [(80, 4, 10, 42), (12, 4, 9, 0), (20, 5, 11, 7)])
def test_bench_order_is_the_trainers(n, batch, steps, seed):
    spec = importlib.util.spec_from_file_location("bench_dpo_vs_trl", ROOT / "examples" / "bench_dpo_vs_trl.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    me = SimpleNamespace(t=SimpleNamespace(seed=seed, batch_size=batch), micro_per_epoch=n // batch, global_bs=batch,
                         data=SimpleNamespace(train=list(range(n))),
                         acc=SimpleNamespace(num_processes=1, process_index=0))
    want = [i for m in range(steps) for i in Trainer._examples(me, m)]
    assert bench.order(n, steps, batch, seed) == want
