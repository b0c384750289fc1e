"""The serving engine without HTTP: continuous batching across adapters of every kind, rows leaving
and joining, LRU residency, corrupt adapters, limits. Each output is compared with the adapter's own
offline greedy output (PeftModel.generate, one prompt alone)."""
from __future__ import annotations

import os
import shutil
import time

import pytest
import torch

from serve_support import EOS, build, load_base, offline_greedy
from serve_support import make_engine as _engine, random_prompt as _prompt
from slimtune import BASE_ADAPTER
from slimtune.serve import Engine, GenRequest, Registry, ServeConfig
from slimtune.serve import kvcache
from slimtune.serve.engine import QueueFull
from slimtune.serve.registry import AdapterLoadError, AdapterNotFound
from slimtune.serve.sampling import next_tokens as _next_tokens

ALL = ["lora-a", "lora-b", "lora-c", "lora-d", "lora-head", "dora", "ia3", "prompt", "prefix", "layerwise", "bottleneck"]
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build(tmp_path_factory.mktemp("serve_engine"), ALL)


def _wait_idle(eng, timeout=10.0):
    end = time.monotonic() + timeout
    while eng.running() and time.monotonic() < end:
        time.sleep(0.01)
    return eng.running()


# ---- pieces ------------------------------------------------------------------------------------
def test_kvcache_rows_join_with_padding_after_the_virtual_tokens():
    from transformers import DynamicCache

    def cache(b, t, fill):
        c = DynamicCache()
        for layer in range(2):
            k = torch.arange(b * t, dtype=torch.float).view(b, 1, t, 1) + fill
            c.update(k, -k, layer)
        return c

    a, b = cache(2, 5, 100), cache(1, 3, 200)  # offset 2: columns 0-1 are virtual tokens
    pad_a = kvcache.join(a, b, offset=2)
    keys = a.layers[0].keys
    assert pad_a == 0 and keys.shape == (3, 1, 5, 1)
    assert keys[2, 0, :2, 0].tolist() == [200, 201]  # virtual tokens stay in front
    assert keys[2, 0, 2:4, 0].tolist() == [0, 0] and keys[2, 0, 4, 0].item() == 202  # padding after them
    kvcache.select(a, torch.tensor([2, 0]))
    assert a.layers[1].values[0, 0, :, 0].tolist() == [-200, -201, 0, 0, -202]
    kvcache.drop_columns(a, 2, 2)
    assert a.layers[0].keys[0, 0, :, 0].tolist() == [200, 201, 202]


def next_tokens(logits, temp, top_p, gens):
    """temperature and top_p only (every other option neutral)."""
    n = len(temp)
    t = {"temp": temp, "top_p": top_p, "top_k": torch.zeros(n, dtype=torch.long), "min_p": torch.zeros(n)}
    return _next_tokens(logits, t, gens)


def test_sampling_greedy_top_p_and_seeds():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.9], [0.0, 0.0, 9.0, 0.0]])
    greedy = next_tokens(logits, torch.zeros(3), torch.ones(3), None)
    assert greedy.tolist() == [1, 0, 2]
    # top_p tiny keeps only the most likely token even at a high temperature
    hot = next_tokens(logits, torch.full((3,), 2.0), torch.full((3,), 1e-6), [None] * 3)
    assert hot.tolist() == [1, 0, 2]
    # a seeded row draws the same tokens whatever else is in its batch
    def draw(batch_logits, row):
        gens = [torch.Generator().manual_seed(7) if i == row else None for i in range(len(batch_logits))]
        return next_tokens(batch_logits, torch.ones(len(batch_logits)), torch.ones(len(batch_logits)), gens)[row]
    wide = torch.zeros(1, 1000)
    alone = [draw(wide, 0).item() for _ in range(1)]
    mixed = [draw(torch.cat([torch.randn(2, 1000), wide]), 2).item() for _ in range(1)]
    assert alone == mixed
    # top_p=0.5 on [0.5, 0.3, 0.2]: only token 0 can be drawn; 0.7 allows {0, 1}
    lg = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(64, 3)
    assert set(next_tokens(lg, torch.ones(64), torch.full((64,), 0.5), [None] * 64).tolist()) == {0}
    assert set(next_tokens(lg, torch.ones(64), torch.full((64,), 0.7), [None] * 64).tolist()) <= {0, 1}


# ---- the engine --------------------------------------------------------------------------------
def test_every_method_runs_batched_and_equals_its_offline_greedy(world):
    """LoRA adapters share a mixed batch with the base; modules_to_save, DoRA, IA3, prompt, prefix,
    bottleneck and an in-place method each run in a batch of their own, all at once, joining at
    different steps."""
    base, ads = world
    reg, eng = _engine(world, ALL)
    placed = {e.name: (e.mixable, e.lane.key[0]) for e in reg.list()}
    assert all(placed[n][0] for n in ("lora-a", "lora-b", "lora-c", "lora-d"))
    assert not any(placed[n][0] for n in ("lora-head", "dora", "ia3", "prompt", "prefix", "layerwise", "bottleneck"))
    assert placed["layerwise"][1] == "own"  # in-place weights: a copy of the base of its own
    eng.start()
    try:
        jobs = []
        names = ALL + [BASE_ADAPTER, "prompt", "prefix", "lora-a", BASE_ADAPTER, "lora-head"]
        for i, n in enumerate(names):
            pr, k = _prompt(i, 2 + i % 7), 4 + i % 5
            jobs.append((n, pr, k, eng.submit(GenRequest(pr, n, max_tokens=k))))
            if i % 3 == 0:
                time.sleep(0.01)  # some arrive while others decode: they join the running batches
        for n, pr, k, h in jobs:
            toks, finish = h.result(60)
            assert toks == offline_greedy(base, ads.get(n), pr, k), n
            assert finish in ("length", "stop")
        assert _wait_idle(eng) == 0
    finally:
        eng.stop()


def test_mixed_rows_join_and_leave_in_the_lanes_adapter_order(world):
    """LoRA rows arriving in any order (repeated adapters, base rows), joining while others decode and
    leaving at different steps: every decode step runs them in the order of the lane's adapters
    (base rows last), so the layers read their stacks in place, and each row's tokens equal its
    request run alone."""
    base, ads = world
    lora = ["lora-a", "lora-b", "lora-c", "lora-d"]
    reg, eng = _engine(world, lora)
    steps: list[list[str]] = []
    decode = eng._decode

    def spy(b):
        steps.append(list(b.names))
        decode(b)

    eng._decode = spy
    eng.start()
    try:
        waves = [["lora-d", BASE_ADAPTER, "lora-b"], ["lora-c", "lora-a", "lora-d"], [BASE_ADAPTER, "lora-b", "lora-a"]]
        jobs = []
        for w, wave in enumerate(waves):
            for j, n in enumerate(wave):
                i = 10 * w + j
                pr, k = _prompt(i, 3 + i % 4), 3 + (i * 7) % 6
                jobs.append([n, pr, k, eng.submit(GenRequest(pr, n, max_tokens=k)), []])
            # the wave's last row has its first token (k >= 3: not its last): the next wave joins a running batch
            jobs[-1][4] = jobs[-1][3].queue.get(timeout=30)[1].tokens
        for n, pr, k, h, first in jobs:
            assert first + h.result(60)[0] == offline_greedy(base, ads.get(n), pr, k), n
        assert _wait_idle(eng) == 0
    finally:
        eng.stop()
    order = {n: i for i, n in enumerate(lora)}
    ranks = [[order.get(n, len(lora)) for n in names] for names in steps]
    assert all(r == sorted(r) for r in ranks), steps
    assert any(len(set(names) - {BASE_ADAPTER}) >= 3 for names in steps)  # the waves did overlap


def test_a_cancelled_row_leaves_and_the_rest_are_unchanged(world):
    base, ads = world
    reg, eng = _engine(world, ["lora-a", "lora-b"])
    eng.start()
    try:
        long = eng.submit(GenRequest(_prompt(1, 5), "lora-a", max_tokens=200))
        first = long.queue.get(timeout=30)[1]
        assert first.tokens and first.finish is None
        others = [(n, _prompt(i, 4), eng.submit(GenRequest(_prompt(i, 4), n, max_tokens=6)))
                  for i, n in enumerate(["lora-b", BASE_ADAPTER, "lora-a"], 2)]
        long.cancel()
        toks, finish = long.result(30)
        assert finish == "cancelled" and len(toks) < 199
        for n, pr, h in others:
            assert h.result(30)[0] == offline_greedy(base, ads.get(n), pr, 6)
        assert _wait_idle(eng) == 0
        assert all(e.pins == 0 for e in reg.list())
    finally:
        eng.stop()


def test_lru_keeps_max_loaded_resident_and_reloads_on_demand(world):
    base, ads = world
    loras = ["lora-a", "lora-b", "lora-c", "lora-d"]
    reg, eng = _engine(world, loras[:2], max_loaded=2)
    for n in loras[2:]:
        reg.add(n, str(ads[n]))  # known and loaded; LRU pushes the oldest out
    assert reg.resident_count() == 2 and len(reg.list()) == 4
    eng.start()
    try:
        jobs = [(n, _prompt(i, 3), eng.submit(GenRequest(_prompt(i, 3), n, max_tokens=5)))
                for i, n in enumerate(loras * 2)]
        for n, pr, h in jobs:
            assert h.result(60)[0] == offline_greedy(base, ads[n], pr, 5), n
        assert reg.evictions >= 2 and reg.resident_count() <= 2
        assert [e.name for e in reg.list()] == sorted(loras)
        # every load and every eviction moved the generation the mixed batches' stacks are trusted under
        assert reg.generation == reg.loads + reg.evictions
    finally:
        eng.stop()


def test_a_corrupt_or_foreign_adapter_leaves_the_served_set_as_it_was(world, tmp_path):
    base, ads = world
    reg, eng = _engine(world, ["lora-a", "lora-head"])
    before = [(e.name, e.resident) for e in reg.list()]
    lanes = {k: lane.names() for k, lane in reg._lanes.items()}
    bad = tmp_path / "truncated"
    shutil.copytree(ads["lora-b"], bad)
    w = bad / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: 200])
    with pytest.raises(AdapterLoadError, match="corrupt or truncated"):
        reg.add("broken", str(bad))
    foreign = tmp_path / "foreign"
    shutil.copytree(ads["lora-a"], foreign)
    cfg = (foreign / "adapter_config.json").read_text().replace('"r": 4', '"r": 6')
    (foreign / "adapter_config.json").write_text(cfg)
    with pytest.raises(AdapterLoadError, match="shape"):
        reg.add("foreign", str(foreign))
    with pytest.raises(AdapterLoadError, match="does not exist"):
        reg.add("missing", str(tmp_path / "nope"))
    with pytest.raises(AdapterNotFound):
        reg.remove("never-loaded")
    assert [(e.name, e.resident) for e in reg.list()] == before
    assert {k: lane.names() for k, lane in reg._lanes.items()} == lanes
    eng.start()
    try:
        for i, n in enumerate(["lora-a", "lora-head", BASE_ADAPTER]):
            pr = _prompt(i, 4)
            assert eng.submit(GenRequest(pr, n, max_tokens=5)).result(30)[0] == offline_greedy(base, ads.get(n), pr, 5)
    finally:
        eng.stop()


def test_adapters_dir_loads_on_first_use_and_hides_a_broken_folder(world, tmp_path):
    base, ads = world
    d = tmp_path / "adapters"
    shutil.copytree(ads["lora-c"], d / "tenant-c")
    shutil.copytree(ads["lora-a"], d / "broken")
    (d / "broken" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    model, _ = load_base(base)
    reg = Registry(model, "tiny", adapters_dir=str(d))
    assert [e.name for e in reg.list()] == ["broken", "tenant-c"] and reg.resident_count() == 0
    eng = Engine(reg, ServeConfig(), [EOS], 0).start()
    try:
        pr = _prompt(3, 4)
        assert eng.submit(GenRequest(pr, "tenant-c", max_tokens=4)).result(30)[0] == offline_greedy(base, ads["lora-c"], pr, 4)
        with pytest.raises(AdapterLoadError):
            eng.submit(GenRequest(pr, "broken", max_tokens=4)).result(30)
        assert [e.name for e in reg.list()] == ["tenant-c"]
        eng.call(lambda: reg.remove("tenant-c")).result(10)
        assert reg.list() == [] and reg.get("tenant-c") is None  # unloaded: not rediscovered from the folder
    finally:
        eng.stop()


def test_unload_while_running_finishes_the_rows_first(world):
    base, ads = world
    reg, eng = _engine(world, ["lora-a"])
    eng.start()
    try:
        pr = _prompt(5, 3)
        h = eng.submit(GenRequest(pr, "lora-a", max_tokens=30))
        assert h.queue.get(timeout=30)[1].finish is None  # running
        eng.call(lambda: reg.remove("lora-a")).result(10)
        assert reg.get("lora-a") is None  # no new request gets it
        rest, finish = h.result(30)
        assert finish in ("length", "stop")
        assert _wait_idle(eng) == 0 and reg.resident_count() == 0 and reg._lanes == {}
    finally:
        eng.stop()


def test_queue_full_and_timeout(world):
    reg, eng = _engine(world, [], max_queue=1)
    eng.submit(GenRequest([1000, 1001], max_tokens=2))  # engine not started: it waits
    with pytest.raises(QueueFull):
        eng.submit(GenRequest([1000, 1001], max_tokens=2))
    reg, eng = _engine(world, [])
    eng.start()
    try:
        assert eng.submit(GenRequest([1000, 1001], max_tokens=50, timeout_s=1e-6)).result(30)[1] == "timeout"
        assert eng.submit(GenRequest([1000, 1001], max_tokens=3)).result(30)[1] == "length"
    finally:
        eng.stop()


def test_eos_ends_a_row_unless_ignore_eos(world):
    base, ads = world
    pr = _prompt(9, 4)
    first = offline_greedy(base, None, pr, 1)[0]
    model, _ = load_base(base)
    eng = Engine(Registry(model, "tiny"), ServeConfig(), [first], 0).start()  # its first token is "EOS"
    try:
        assert eng.submit(GenRequest(pr, max_tokens=6)).result(30) == ([first], "stop")
        toks, finish = eng.submit(GenRequest(pr, max_tokens=6, ignore_eos=True)).result(30)
        assert len(toks) == 6 and finish == "length" and toks[0] == first
    finally:
        eng.stop()


def test_prefix_cache_reuses_shared_prompt_blocks_with_the_same_output(world):
    """Prompts sharing 40 tokens: later rows reuse the cached blocks of their own adapter (never another's)
    and still give the offline greedy output; rows with and without hits share one prefill."""
    base, ads = world
    reg, eng = _engine(world, ["lora-a", "lora-b", "prompt"], prefix_block=16)
    shared = _prompt(100, 40)
    jobs = [(n, shared + _prompt(200 + i, 1 + i % 5)) for i, n in enumerate(["lora-a", "lora-b", BASE_ADAPTER] * 3)]
    jobs += [("prompt", shared + [1500]), ("lora-a", _prompt(300, 7)), ("lora-a", shared[:33])]
    eng.start()
    try:
        first = [eng.submit(GenRequest(p, n, max_tokens=5)) for n, p in jobs[:3]]
        for h in first:
            h.result(30)
        hits0 = eng.prefix.hit_tokens
        handles = [eng.submit(GenRequest(p, n, max_tokens=5)) for n, p in jobs]
        for (n, p), h in zip(jobs, handles):
            assert h.result(30)[0] == offline_greedy(base, ads.get(n), p, 5), n
        assert eng.prefix.hit_tokens - hits0 >= 9 * 32  # 2 of the 40 shared tokens' blocks per row
    finally:
        eng.stop()


def _collect(h, timeout=60):
    """A handle's events until it finishes: (tokens, per-token log-probs, prompt log-probs)."""
    toks, lps, plps = [], [], None
    while True:
        ev = h.queue.get(timeout=timeout)[1]
        toks += ev.tokens
        lps += [lp[1] for lp in ev.logprobs or []]
        plps = ev.prompt_logprobs if ev.prompt_logprobs is not None else plps
        if ev.finish is not None:
            return toks, lps, plps


@pytest.mark.parametrize("kernel", ["off", "on"])
def test_mixed_adapter_dtype_bfloat16_needs_the_kernel_and_stays_close(world, kernel, monkeypatch):
    """--mixed-adapter-dtype bfloat16: refused while the decode kernel is off (torch's decode path would
    widen the whole stack every step), one message naming the fix. With the kernel on it runs on either
    CPU kind (SLIMTUNE_CPU_BF16=0 forces the AVX2-only one: a bf16 stack is widened, never computed in
    bf16), and a LoRA row's prompt log-probs (the prefill's bmm) and its decoded tokens' log-probs (the
    kernel) stay within bf16 rounding of the exact default's."""
    from slimtune.kernels import lora_rows
    from slimtune.serve.server import ServeError, _check_mixed_dtype

    monkeypatch.setenv("SLIMTUNE_CPU_BF16", "0")
    cfg = ServeConfig(mixed_adapter_dtype="bfloat16")
    line = lora_rows.enable(kernel)
    try:
        if kernel == "off":
            with pytest.raises(ServeError, match=r"only through the lora_rows kernel, which is not in use \(mixed "
                                                 r"LoRA decode: torch bmm \(--lora-kernel off\)\); leave "
                                                 "--mixed-adapter-dtype at 'model'"):
                _check_mixed_dtype(cfg, line)
            with pytest.raises(ServeError, match="a speech base"):
                _check_mixed_dtype(cfg, None)
            return
        _check_mixed_dtype(cfg, line)
        pr = _prompt(7, 9)
        got = {}
        for dt in ("model", "bfloat16"):
            _, eng = _engine(world, ["lora-b", "lora-a"], mixed_adapter_dtype=dt)
            eng.start()
            try:
                hs = [eng.submit(GenRequest(pr, n, max_tokens=4, echo=True, logprobs=0, ignore_eos=True))
                      for n in ("lora-b", "lora-a")]
                got[dt] = [_collect(h) for h in hs]
            finally:
                eng.stop()
    finally:
        lora_rows.enable("off")
    for exact, half in zip(got["model"], got["bfloat16"]):
        assert half[0] == exact[0]  # the same greedy tokens
        p_exact, p_half = (torch.tensor([e[1] for e in r[2][1:]]) for r in (exact, half))
        assert not torch.equal(p_exact, p_half)  # a real change, never silently the default's path
        torch.testing.assert_close(p_half, p_exact, atol=5e-2, rtol=0)
        torch.testing.assert_close(torch.tensor(half[1]), torch.tensor(exact[1]), atol=5e-2, rtol=0)


def _count_prefills(eng) -> list[int]:
    calls: list[int] = []
    prefill = eng._prefill

    def spy(b, rows):
        calls.append(len(rows))
        prefill(b, rows)

    eng._prefill = spy
    return calls


def _staggered(eng, jobs, pause_s):
    handles = []
    for n, pr, k in jobs:
        handles.append(eng.submit(GenRequest(pr, n, max_tokens=k)))
        time.sleep(pause_s)
    return handles


def test_an_idle_engine_gathers_a_wave_into_one_prefill(world):
    """Requests arriving a few ms apart on an idle engine (a wave of clients answered in one step)
    share one prefill forward and one new batch; with --admit-wait-ms 0 the first is prefilled alone.
    The answers are the same either way (each equals its request run alone)."""
    base, ads = world
    names = ["lora-a", "lora-b", BASE_ADAPTER, "lora-c", "lora-d", "lora-a"]
    jobs = [(n, _prompt(40 + i, 3 + i % 3), 4) for i, n in enumerate(names)]
    want = [offline_greedy(base, ads.get(n), pr, k) for n, pr, k in jobs]
    # generous windows: a loaded CI machine may pause a thread for tens of ms between two submits
    for wait_ms, gap_ms, pause_s in ((5000, 400, 0.002), (0, 0, 0.15)):
        _, eng = _engine(world, ["lora-a", "lora-b", "lora-c", "lora-d"], admit_wait_ms=wait_ms, admit_gap_ms=gap_ms)
        calls = _count_prefills(eng)
        eng.start()
        try:
            got = [h.result(60)[0] for h in _staggered(eng, jobs, pause_s)]
            assert _wait_idle(eng) == 0
        finally:
            eng.stop()
        assert got == want
        if wait_ms:
            assert calls == [len(jobs)]
        else:
            assert len(calls) >= 2 and calls[0] == 1, calls


def test_gathering_never_holds_up_running_rows_a_full_batch_or_a_model_change(world):
    """The wait applies only to an idle engine: with rows running (the step gathers arrivals by
    itself), a full batch waiting, or a queued adapter load, `_gather` returns at once even with a
    window of minutes."""
    _, eng = _engine(world, ["lora-a"], admit_wait_ms=600_000, admit_gap_ms=600_000, max_batch=2)
    one = GenRequest([1000, 1001], max_tokens=2)
    eng.submit(one)  # the engine is not started: _gather runs here, on the test's thread
    t0 = time.monotonic()
    eng._batches = {"running": object()}  # rows running
    eng._gather()
    eng._batches = {}
    eng.submit(one)  # a full batch waiting (max_batch 2)
    eng._gather()
    eng._waiting.pop()
    eng._ops.append((lambda: None, None))  # one request waiting, an adapter load queued
    eng._gather()
    assert time.monotonic() - t0 < 30  # three returns, none waited out its 10-minute window


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


def test_release_pool_frees_the_calling_threads_openmp_workers(world, monkeypatch, caplog):
    """--dedicated-cpus: the loading thread's libgomp pool is freed when the engine starts (openmp.py): with two
    pools past the CPU count libgomp throttles its workers and every small op of a decode step pays a
    futex wake-up. Here: a thread's parallel op makes a worker thread, `release_pool` ends it, and
    `Engine.start` calls it on the starting thread under --dedicated-cpus (only: beside other busy
    processes spinning workers stall)."""
    import threading

    from slimtune.serve import openmp

    if not torch.backends.openmp.is_available() or not os.path.isdir("/proc/self/task"):
        pytest.skip("torch without OpenMP, or no /proc: no libgomp pool to free")
    got = {}

    def work():
        was = torch.get_num_threads()
        torch.set_num_threads(2)  # this thread's team: itself + one pooled worker
        before = _tasks()
        x = torch.ones(8_000_000)
        for _ in range(3):
            x.add_(1)  # far above at::parallel_for's grain: runs on the team
        got["with_pool"] = _tasks() - before
        got["released"] = openmp.release_pool()
        end = time.monotonic() + 5
        while _tasks() - before > 0 and time.monotonic() < end:
            time.sleep(0.01)  # the freed workers exit after the pause returns
        got["after"] = _tasks() - before
        torch.set_num_threads(was)  # (also the default new threads start from)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert got == {"with_pool": 1, "released": True, "after": 0}, got
    calls = []
    monkeypatch.setattr(openmp, "release_pool", lambda: calls.append(threading.get_ident()) or True)
    for dedicated in (False, True):
        _, eng = _engine(world, [], dedicated_cpus=dedicated)
        eng.start()
        eng.stop()
    assert calls == [threading.get_ident()]  # with --dedicated-cpus only, on the thread that starts the engine
    monkeypatch.setattr(openmp, "release_pool", lambda: False)  # not libgomp, or one that cannot pause
    with caplog.at_level("WARNING", logger="slimtune.serve"):
        _, eng = _engine(world, [], dedicated_cpus=True)
        eng.start()
        eng.stop()
    assert "--dedicated-cpus did nothing" in caplog.text
