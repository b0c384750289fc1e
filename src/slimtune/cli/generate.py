"""`slimtune generate PROMPT --adapter A [--adapter B ...]`: one answer per adapter (and the base's)."""
from __future__ import annotations

from .common import adapter_folder, load_base, quiet_hf
from .errors import CommandError

HELP = "prompt -> text with one or several adapters (or a chat turn)"


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help=HELP,
                       description="Generate text from a prompt. Several --adapter flags print one answer per "
                       "adapter (and --compare-base the base model's). Instruct models get the prompt as a chat "
                       "turn through their chat template (--no-chat to send it raw).")
    g.add_argument("prompt", help="the prompt (a user turn with --chat)")
    g.add_argument("--model", help="base model (builtin name or folder); default: the adapter's base")
    g.add_argument("--adapter", action="append", help="adapter folder; repeat for several")
    g.add_argument("--chat", dest="chat", action="store_true", default=None, help="wrap as a chat turn")
    g.add_argument("--no-chat", dest="chat", action="store_false", help="send the prompt as raw text")
    g.add_argument("--system", help="system message for --chat")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--compare-base", action="store_true", help="also print the base model's answer")
    g.add_argument("--image", help="vision-language models: an image file the prompt asks about")
    g.set_defaults(fn=run)


def run(a) -> int:
    import torch

    from .. import PeftModel

    quiet_hf()
    adapters = [adapter_folder(x) for x in a.adapter or []]  # a run folder means its best adapter
    model, tok, path, task = load_base(a.model, adapters[0] if adapters else None)
    if a.image or task == "image_text_to_text":
        return _with_image(a, model, tok, path, adapters)
    if task != "CAUSAL_LM":
        raise CommandError(f"generate needs a causal LM adapter; {adapters[0]} is {task}: `slimtune predict RUN FILE` "
                           "labels new texts with a classifier, `slimtune eval RUN` scores its held-out split")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if a.chat or (a.chat is None and getattr(tok, "chat_template", None)):
        from ..train.data import ensure_chat_template

        ensure_chat_template(tok)
        msgs = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": a.prompt}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tok(a.prompt, return_tensors="pt")
    enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    names = []
    if adapters:
        model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
        names.append("a0")
        for i, ad in enumerate(adapters[1:], 1):
            model.load_adapter(ad, adapter_name=f"a{i}")
            names.append(f"a{i}")
    kw = dict(max_new_tokens=a.max_new_tokens, do_sample=a.temperature > 0, pad_token_id=tok.pad_token_id)
    if a.temperature > 0:
        kw.update(temperature=a.temperature, top_p=0.95)
    torch.manual_seed(a.seed)
    n_in = enc["input_ids"].shape[1]
    runs = [("base model", None)] if (a.compare_base or not names) else []
    runs += [(f"adapter {adapters[i]}", n) for i, n in enumerate(names)]
    for label, name in runs:
        with torch.no_grad():
            if name is None and names:
                with model.disable_adapter():
                    out = model.generate(**enc, **kw)
            elif name is None:
                out = model.generate(**enc, **kw)
            else:
                model.set_adapter(name)
                out = model.generate(**enc, **kw)
        text = tok.decode(out[0, n_in:], skip_special_tokens=True).strip()
        print(f"[{label}]\n{text}\n" if len(runs) > 1 else text)
    return 0


def _with_image(a, model, tok, path: str, adapters: list[str]) -> int:
    """A vision-language model's answer about --image, per adapter (and the base's with --compare-base)."""
    from .. import PeftModel
    from ..train.datafiles import DataError
    from ..train.tasks import task_for_adapter

    spec = task_for_adapter(None, path)
    if spec.name != "image_text_to_text":
        raise CommandError(f"--image needs a vision-language model (LLaVA, Idefics3 / SmolVLM, ...); {path} is a "
                           f"{spec.kind}")
    if not a.image:
        raise CommandError("a vision-language model answers about an image: pass --image FILE")
    runs = [("base model", None)] if (a.compare_base or not adapters) else []
    runs += [(f"adapter {ad}", ad) for ad in adapters]
    base = model
    for label, ad in runs:
        m = PeftModel.from_pretrained(base, ad) if ad else base
        try:
            rows = spec.predict(m if ad else _Plain(m), tok, [{"image": a.image}],
                                {"prompt": a.prompt, "max_new_tokens": a.max_new_tokens, "batch_size": 1})
        except DataError as e:
            raise CommandError(str(e)) from None
        print(f"[{label}]\n{rows[0]['answer']}\n" if len(runs) > 1 else rows[0]["answer"])
        if ad:
            base = m.unload()
    return 0


class _Plain:
    """The base model where `predict` expects a PeftModel (get_base_model / eval)."""

    def __init__(self, model) -> None:
        self.model = model

    def get_base_model(self):
        return self.model

    def eval(self):
        self.model.eval()
        return self
