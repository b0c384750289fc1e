"""Writes tiny random-init vision-language models and a small image question-answer set, offline.

No vision-language checkpoint ships in any package this project can install, so the
`image_text_to_text` task is shown (and tested) on models built from transformers' config classes:

    python examples/make_tiny_vlm.py runs/tiny_vlm        # then:
    slimtune train examples/tiny_vlm.yaml

writes
    runs/tiny_vlm/llava/      LlavaForConditionalGeneration (CLIP vision tower + Llama), 32x32 images
    runs/tiny_vlm/idefics3/   Idefics3ForConditionalGeneration (SigLIP + Llama: SmolVLM's architecture)
    runs/tiny_vlm/data/       train.jsonl / validation.jsonl: chat rows with `images: [path]` and an
                              `<image>` placeholder; each image is one colour, the answer its name

Each folder holds the model (safetensors), its processor (image processor + a word-level tokenizer
with the model's image tokens) and a chat template, as `save_pretrained` of a real one would.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 40),
           "white": (245, 245, 245), "black": (10, 10, 10)}
QUESTIONS = ["What colour is this image?", "Which colour do you see?", "Name the colour of the picture."]
WORDS = sorted({w.strip("?.").lower() for q in QUESTIONS for w in q.split()} | set(COLOURS) | {"?", "."})
ROLES = ["<|user|>", "<|assistant|>", "<|system|>", "<end>"]
# the template renders string contents (with their <image> placeholders) and the processors' list form
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ ' <end> ' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}")


def _tokenizer(extra: list[str]):
    """A word-level tokenizer over the questions' words, the roles and the model's image tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", *ROLES, *extra]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="<end>")
    fast.add_special_tokens({"additional_special_tokens": ROLES[:3] + extra})
    return fast


def _text_config(vocab: int, pad: int, eos: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=pad, eos_token_id=eos, bos_token_id=2, tie_word_embeddings=False)


def tiny_llava(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, \
        LlavaProcessor

    tok = _tokenizer(["<image>"])
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=_text_config(len(tok), tok.pad_token_id, tok.eos_token_id),
                      image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    proc = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                crop_size={"height": 32, "width": 32}),
                          tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def tiny_idefics3(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, \
        Idefics3Processor, Idefics3VisionConfig

    extra = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"] + \
        [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tok = _tokenizer(extra)
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=8)
    cfg = Idefics3Config(vision_config=vision, text_config=_text_config(len(tok), tok.pad_token_id, tok.eos_token_id),
                         image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(cfg)
    # (32 / 8)^2 patches, merged 2x2 by the connector: 4 image tokens per image
    proc = Idefics3Processor(image_processor=Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32}),
        tokenizer=tok, image_seq_len=4, chat_template=CHAT_TEMPLATE)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def colour_data(out: Path, n_train: int = 48, n_val: int = 24, seed: int = 0) -> Path:
    """train.jsonl / validation.jsonl of one-colour images (a little noise each) and their names."""
    from PIL import Image

    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for split, n in (("train", n_train), ("validation", n_val)):
        with open(out / f"{split}.jsonl", "w") as f:
            for i in range(n):
                name = names[i % len(names)]
                rgb = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in COLOURS[name])
                path = f"images/{split}_{i:03d}.png"
                Image.new("RGB", (40, 40), rgb).save(out / path)
                row = {"messages": [{"role": "user", "content": "<image>" + rng.choice(QUESTIONS)},
                                    {"role": "assistant", "content": name}], "images": [path]}
                f.write(json.dumps(row) + "\n")
    return out


def main(root: str = "runs/tiny_vlm") -> None:
    out = Path(root)
    tiny_llava(out / "llava")
    tiny_idefics3(out / "idefics3")
    colour_data(out / "data")
    print(f"wrote {out}/llava, {out}/idefics3 (tiny random-init VLMs) and {out}/data (colour questions)")


if __name__ == "__main__":
    main(*sys.argv[1:2])
