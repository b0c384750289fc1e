"""A batch's forward (serve/forward.py's ModelCall): the LM head reads one contiguous position per
row, Gemma 4's KV-shared layers keep the int logits_to_keep, and a lane's batch of base rows only
runs on the plain base model. Outputs are compared with each adapter's offline greedy output."""
from __future__ import annotations

import pytest
import torch

from serve_support import build, offline_greedy
from serve_support import make_engine as _engine, random_prompt as _prompt
from slimtune import BASE_ADAPTER
from slimtune.serve import GenRequest


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build(tmp_path_factory.mktemp("serve_forward"), ["lora-a", "lora-b"])


def test_the_lm_head_reads_one_contiguous_position_per_row(world):
    """A prefill of several rows and columns keeps the LM head's last position only, as a contiguous
    (B, 1, H) gathered by index: transformers' int `logits_to_keep=1` would pass a strided view, which
    torch's matmul runs as a bmm over the head's weight expanded to every row when the weights are
    frozen (a served lane's are). Greedy answers stay the offline ones."""
    base, ads = world
    reg, eng = _engine(world, ["lora-a", "lora-b"])
    seen = []
    lane = reg.get("lora-a").lane
    assert not lane.hf.lm_head.weight.requires_grad  # frozen (the base's, under every lane): the case that ran the bmm
    hook = lane.hf.lm_head.register_forward_pre_hook(
        lambda m, args: seen.append((args[0].shape, args[0].is_contiguous())))
    # submitted before the engine starts: one prefill of the three rows (the case, whatever the timing)
    jobs = [(n, _prompt(i, 5 + i), eng.submit(GenRequest(_prompt(i, 5 + i), n, max_tokens=3)))
            for i, n in enumerate(["lora-a", "lora-b", BASE_ADAPTER])]
    eng.start()
    try:
        for n, pr, h in jobs:
            assert h.result(60)[0] == offline_greedy(base, ads.get(n), pr, 3), n
    finally:
        eng.stop()
        hook.remove()
    assert seen[0][0][0] == 3, seen  # the prefill: three rows of 5-7 columns
    assert all(shape[1] == 1 and contiguous for shape, contiguous in seen), seen


def test_the_last_position_by_index_except_where_the_model_wants_an_int():
    """Gemma 4's KV-shared layers skip the positions an int logits_to_keep leaves out and keep them all
    for an index: such a model (its config or its text_config has num_kv_shared_layers) keeps the int."""
    from types import SimpleNamespace

    from slimtune.serve.registry import _placement

    class Model(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config

        def forward(self, input_ids=None, past_key_values=None, logits_to_keep=0):
            raise AssertionError("not called")

    plain = SimpleNamespace(num_hidden_layers=2)
    shared = SimpleNamespace(text_config=SimpleNamespace(num_kv_shared_layers=4))
    assert _placement(("k",), Model(plain), None, None, 0).keep_by_index
    assert not _placement(("k",), Model(shared), None, None, 0).keep_by_index
    assert not _placement(("k",), Model(SimpleNamespace(num_kv_shared_layers=1)), None, None, 0).keep_by_index


def test_a_lanes_batch_of_base_rows_runs_on_the_plain_base(world):
    """Base rows join the adapters' lane (so adapter rows can join them), but while a batch holds base
    rows only, its forwards run on the plain base model: the same weights and cache, none of the
    lane's adapter wrappers. An adapter row joining sends the batch back through the lane."""
    base, ads = world
    reg, eng = _engine(world, ["lora-a", "lora-b"])
    lane = reg.get("lora-a").lane
    calls = {"plain": 0, "lane": 0}
    hooks = [reg.plain.model.register_forward_pre_hook(lambda m, a: calls.__setitem__("plain", calls["plain"] + 1)),
             lane.hf.register_forward_pre_hook(lambda m, a: calls.__setitem__("lane", calls["lane"] + 1))]
    base_jobs = [(_prompt(i, 4 + i), eng.submit(GenRequest(_prompt(i, 4 + i), BASE_ADAPTER, max_tokens=4)))
                 for i in range(2)]
    eng.start()
    try:
        for pr, h in base_jobs:
            assert h.result(60)[0] == offline_greedy(base, None, pr, 4)
        assert calls == {"plain": 4, "lane": 0}  # one prefill and three decode steps, all on the base
        assert reg._base_placement() is lane.mixed  # placed in the lane all the same
        jobs = [(n, _prompt(9 + i, 5), eng.submit(GenRequest(_prompt(9 + i, 5), n, max_tokens=3)))
                for i, n in enumerate([BASE_ADAPTER, "lora-b"])]
        for n, pr, h in jobs:
            assert h.result(60)[0] == offline_greedy(base, ads.get(n), pr, 3), n
        assert calls["lane"] >= 3  # with an adapter row in the batch: the lane
    finally:
        eng.stop()
        for h in hooks:
            h.remove()
