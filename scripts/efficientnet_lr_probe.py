"""The bare-script probe behind README's EfficientNet-Lite0 paragraph: the job's split of the textile
defects (192 train / 96 validation, seed 42), the same seeded batches of 16, AdamW + warm-up/cosine,
BatchNorm in eval mode (the loader's), and either conv LoRA + the head in full, or the head alone.

    python scripts/efficientnet_lr_probe.py LR STEPS conv|none IMAGE_SIZE [LORA_ALPHA]
    python scripts/efficientnet_lr_probe.py 1e-2 24 conv 224 0.5     # r=8: alpha/r = 1/16 -> 0.823
    python scripts/efficientnet_lr_probe.py 1e-2 24 conv 224 2       # alpha/r = 1/4      -> 0.521
    python scripts/efficientnet_lr_probe.py 1e-2 24 none 224         # the head alone     -> 0.771
"""
import math
import os
import sys
import time

import torch
torch.set_num_threads(1)
from slimtune import LoraConfig, get_peft_model
from slimtune.train.datasets_offline import textile_defects
from slimtune.train.tasks.cnn import efficientnet_lite0, cnn_processor
from slimtune.train.tasks.image_classification import open_image, pixels
from slimtune.train.data import carve
from pathlib import Path
lr, steps, lora, size = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]); alpha = float(sys.argv[5]) if len(sys.argv) > 5 else 16
rows, fmt, info = textile_defects()
rest, val = carve(rows, 96, 42); tr = rest[:192]
labels = sorted({r["label"] for r in rows}); L = {l: i for i, l in enumerate(labels)}
from transformers import ViTImageProcessorPil as P
proc = P(size={"height": size, "width": size}, image_mean=[0.5]*3, image_std=[0.5]*3)
cache = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"textile_px{size}.pt")  # the decoded pixels, reused
if os.path.exists(cache): Xtr, ytr, Xva, yva = torch.load(cache, weights_only=True)
else:
    px = lambda rs: torch.cat([pixels(proc, [open_image(Path(r["image"]), "x") for r in rs[i:i+32]]) for i in range(0, len(rs), 32)])
    Xtr, Xva = px(tr), px(val); ytr = torch.tensor([L[r["label"]] for r in tr]); yva = torch.tensor([L[r["label"]] for r in val])
    torch.save((Xtr, ytr, Xva, yva), cache)
torch.manual_seed(0)
m = efficientnet_lite0(3)
tm = ["_expand_conv", "_project_conv", "_conv_head"] if lora == "conv" else (["_conv_head"] if lora == "head" else ["_fc"])
pm = get_peft_model(m, LoraConfig(r=8, lora_alpha=alpha, target_modules=tm, modules_to_save=["_fc"] if lora != "none" else None))
if lora == "none":
    for n, p in pm.named_parameters(): p.requires_grad = "_fc" in n and "lora" not in n
params = [p for p in pm.parameters() if p.requires_grad]
print(sum(p.numel() for p in params))
opt = torch.optim.AdamW(params, lr=lr, weight_decay=0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s+1)/max(1, int(0.05*steps))) * 0.5*(1+math.cos(math.pi*s/steps)))
def ev():
    pm.eval()
    with torch.no_grad(): lg = torch.cat([pm(pixel_values=Xva[i:i+32])["logits"] for i in range(0, 96, 32)])
    pm.train(); return (lg.argmax(-1) == yva).float().mean().item()
t = time.time(); g = torch.Generator().manual_seed(0)
pm.train()
for s in range(steps):
    idx = torch.randint(0, len(ytr), (16,), generator=g)
    out = pm(pixel_values=Xtr[idx], labels=ytr[idx]); opt.zero_grad(); out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sched.step()
    if (s+1) % max(1, steps//3) == 0: print(f"step {s+1} loss {out['loss'].item():.3f} val {ev():.3f} t {time.time()-t:.0f}", flush=True)
print(f"RESULT alpha {alpha} lr {lr} steps {steps} lora {lora} size {size} val {ev():.3f} time {time.time()-t:.0f}")
