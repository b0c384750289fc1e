"""Regenerate examples/data/spoken_digits/: "zero".."nine" spoken by espeak-ng in several voices,
speeds and pitches, 16 kHz mono 16-bit WAV, with train.csv and heldout.csv (`audio` path relative to
the CSV, `text` transcript). The split is by VOICE: no held-out voice speaks in the training clips, so
the held-out score measures voices the adapter never heard.

    apt-get install -y espeak-ng sox          # Debian packages; the clips are shipped, so only this script needs them
    python scripts/make_spoken_digits.py      # rewrites examples/data/spoken_digits/ (~2 MB)

The clips were made with espeak-ng 1.51 and sox 14.4 (Debian 12); other versions may speak slightly
differently, so the shipped files, not this script, are what the examples and tests read.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import tempfile
from pathlib import Path

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# (espeak-ng voice + variant, words per minute, pitch 0-99): each row speaks all ten digits once
TRAIN = [("en-us+m1", 150, 50), ("en-us+f2", 185, 70), ("en-gb+m3", 165, 40), ("en-gb+f4", 140, 60),
         ("en-gb-scotland+m2", 175, 45), ("en-gb-scotland+f1", 150, 75), ("en-gb-x-gbclan+m4", 160, 35),
         ("en-gb-x-gbcwmd+f3", 170, 65)]
HELDOUT = [("en-029+m5", 160, 50), ("en-us-nyc+f5", 170, 60), ("en-gb-x-rp+m7", 150, 40)]


def speak(word: str, voice: str, wpm: int, pitch: int, out: Path, tmp: Path) -> None:
    """espeak-ng's 22 kHz WAV -> 16 kHz mono 16-bit (no dither, so reruns give the same bytes), leading /
    trailing silence trimmed to 0.1 s."""
    raw = tmp / "raw.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-p", str(pitch), "-w", str(raw), word], check=True)
    subprocess.run(["sox", "-D", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(out),
                    "silence", "1", "0.02", "0.1%", "reverse", "silence", "1", "0.02", "0.1%", "reverse",
                    "pad", "0.1", "0.1"], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "examples/data/spoken_digits"))
    args = ap.parse_args()
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed: apt-get install -y espeak-ng sox")
    out = Path(args.out)
    shutil.rmtree(out / "clips", ignore_errors=True)
    (out / "clips").mkdir(parents=True)
    with tempfile.TemporaryDirectory() as t:
        for split, voices in (("train", TRAIN), ("heldout", HELDOUT)):
            rows = []
            for voice, wpm, pitch in voices:
                tag = voice.replace("+", "_")
                for word in DIGITS:
                    name = f"clips/{tag}_{word}.wav"
                    speak(word, voice, wpm, pitch, out / name, Path(t))
                    rows.append({"audio": name, "text": word, "voice": voice})
            with open(out / f"{split}.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["audio", "text", "voice"])
                w.writeheader()
                w.writerows(rows)
            print(f"{split}: {len(rows)} clips, voices {', '.join(v for v, _, _ in voices)}")
    size = sum(p.stat().st_size for p in (out / "clips").iterdir())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
