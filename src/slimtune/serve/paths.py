"""Where `POST /v1/load_lora_adapter` may read adapters from: the allowed roots.

The admin endpoint takes a folder path from the network. Without a fence it reads any folder the
server process can (`../../home/x/other-run`), and different errors for "missing" and "not an
adapter" tell a caller what exists on the server. So a path is taken only when, with every symlink
resolved (`os.path.realpath`), it lies inside one of the roots (`--adapters-dir` and each
`--allow-adapter-path`) and holds an `adapter_config.json`; a relative path is read against the
first root. Anything else (outside, missing, not a folder, no config, a symlink leading out) gets
one and the same message, which says what the server accepts and not what it found.
"""
from __future__ import annotations

import os


class AdapterPathRefused(ValueError):
    """The path is not an adapter folder under an allowed root (or does not exist: the same words)."""


class AdapterRoots:
    def __init__(self, roots: list[str]) -> None:
        self.roots = [os.path.realpath(r) for r in roots if r]

    def resolve(self, path: str) -> str:
        """The real path of an adapter folder inside a root, else AdapterPathRefused."""
        full = os.path.join(self.roots[0], path) if self.roots and not os.path.isabs(path) else path
        real = os.path.realpath(full)
        if not self.contains(real) or not os.path.isfile(os.path.join(real, "adapter_config.json")):
            raise AdapterPathRefused(self.refusal(path))  # the path as sent: nothing of what was found
        return real

    def contains(self, path: str) -> bool:
        """Whether `path` (symlinks resolved) lies inside a root (for --adapters-dir entries)."""
        real = os.path.realpath(path)
        return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in self.roots)

    def refusal(self, path: str) -> str:
        if not self.roots:
            return ("loading adapters through the API is off: start the server with --adapters-dir DIR or "
                    "--allow-adapter-path ROOT, and put the adapter folder there")
        return (f"lora_path '{path}' is not an adapter folder (with adapter_config.json) under the server's allowed "
                "roots; put it under --adapters-dir or a root given with --allow-adapter-path")
