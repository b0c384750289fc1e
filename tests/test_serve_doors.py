"""The server's doors: API loads only from allowed roots (symlinks resolved, one message for refused
and missing), route arms checked against each key's adapters at start-up and on PUT, /v1/models
telling the real limits, non-text content parts as a clear 400. In process (TestClient)."""
from __future__ import annotations

import os
import shutil

import pytest
from starlette.testclient import TestClient

from serve_support import build, load_base
from slimtune.serve import ServeConfig, ServeError, build_app, make_server

ADMIN = {"Authorization": "Bearer sk-admin-0123456789"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_doors")
    base, ads = build(tmp, ["lora-a"])
    roots = {k: tmp / k for k in ("dir", "extra", "outside")}
    for d in roots.values():
        d.mkdir()
    shutil.copytree(ads["lora-a"], roots["extra"] / "good")
    shutil.copytree(ads["lora-a"], roots["dir"] / "in-dir")
    shutil.copytree(ads["lora-a"], roots["outside"] / "secret")
    os.symlink(roots["outside"] / "secret", roots["extra"] / "link-out")  # a symlink leading out of the roots
    os.symlink(roots["outside"] / "secret", roots["dir"] / "dir-link-out")  # the operator's own link
    return base, ads, roots


@pytest.fixture(scope="module")
def client(world):
    base, ads, roots = world
    model, tok = load_base(base)
    cfg = ServeConfig(served_model_name="tiny", allow_adapter_paths=(str(roots["extra"]),), max_prompt_tokens=100,
                      max_tokens=50)
    srv = make_server(model, tok, cfg, adapters_dir=str(roots["dir"]))
    with TestClient(build_app(srv)) as c:
        yield srv, c


def _load(c, name, path):
    return c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})


def test_api_loads_only_from_allowed_roots(world, client):
    base, ads, roots = world
    srv, c = client
    assert _load(c, "good", roots["extra"] / "good").status_code == 200
    assert _load(c, "rel", "in-dir").status_code == 200  # relative: read against --adapters-dir
    refused = {  # each must get the same answer, whether or not the folder exists
        "outside": roots["outside"] / "secret",
        "dotdot": "../outside/secret",
        "dotdot-abs": f"{roots['extra']}/../outside/secret",
        "symlink": roots["extra"] / "link-out",
        "missing-in-root": roots["extra"] / "nothing-here",
        "missing-outside": roots["outside"] / "nothing-here",
        "not-an-adapter": roots["extra"],
        "etc": "/etc",
    }
    messages = set()
    for name, path in refused.items():
        r = _load(c, name, path)
        assert r.status_code == 400, (name, r.text)
        err = r.json()["error"]
        assert err["code"] == "adapter_path_refused" and err["param"] == "lora_path"
        messages.add(err["message"].replace(str(path), "P"))
    assert len(messages) == 1 and "--allow-adapter-path" in messages.pop()
    ids = {m["id"] for m in c.get("/v1/models").json()["data"]}
    assert {"good", "rel", "in-dir"} <= ids and not ids & set(refused)
    # a symlink the operator put in --adapters-dir is served under its name (the folder is the operator's
    # list), but an API load by path through it resolves outside the roots and is refused
    assert "dir-link-out" in ids
    r = _load(c, "via-link", "dir-link-out")
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_path_refused"


def test_no_roots_means_no_api_loads(world):
    base, ads, roots = world
    model, tok = load_base(base)
    srv = make_server(model, tok, ServeConfig(served_model_name="tiny"))
    with TestClient(build_app(srv)) as c:
        r = _load(c, "x", roots["extra"] / "good")
        assert r.status_code == 400 and "--allow-adapter-path" in r.json()["error"]["message"]


def test_models_tell_the_real_limits(client):
    srv, c = client
    card = c.get("/v1/models/tiny").json()
    # the tiny model's context is 256: prompt <= 100 (--max-prompt-tokens) and max_tokens <= 50
    assert card["max_model_len"] == 150 and card["max_prompt_tokens"] == 100 and card["max_tokens"] == 50
    assert c.post("/v1/completions", json={"model": "tiny", "prompt": [5] * 100, "max_tokens": 50}).status_code == 200
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": [5] * 101, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_non_text_content_parts_are_a_clear_400(client):
    srv, c = client
    parts = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": parts}]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "unsupported_content" and err["param"] == "messages.0.content.1.type"
    assert "image_url" in err["message"] and "text" in err["message"]
    ok = c.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": parts[:1]}],
                                              "max_tokens": 2})
    assert ok.status_code == 200


KEYS = """
keys:
  - {key: sk-admin-0123456789, admin: true, adapters: ["*"], routes: ["*"]}
  - {key: sk-alpha-0123456789, adapters: ["alpha"], routes: ["ab"]}
routes:
  ab: {alpha: 0.5, %s: 0.5}
"""


def test_route_arms_are_checked_against_each_keys_adapters(world, tmp_path):
    base, ads, roots = world
    model, tok = load_base(base)
    adapters = {"alpha": str(ads["lora-a"]), "beta": str(ads["lora-a"])}
    keys = tmp_path / "keys.yaml"
    keys.write_text(KEYS % "beta")  # alpha's key gets route ab, whose arm beta it may not use
    with pytest.raises(ServeError, match="key 'key1' may use the route but not its arm 'beta'"):
        make_server(model, tok, ServeConfig(served_model_name="tiny"), adapters, keys=str(keys))
    keys.write_text(KEYS % "alpha")
    srv = make_server(model, tok, ServeConfig(served_model_name="tiny"), adapters, keys=str(keys))
    with TestClient(build_app(srv)) as c:
        alpha = {"Authorization": "Bearer sk-alpha-0123456789"}
        assert c.post("/v1/completions", json={"model": "ab", "prompt": "x", "max_tokens": 1}, headers=alpha
                      ).headers["x-slimtune-adapter"] == "alpha"
        r = c.put("/v1/routes/ab", json={"arms": {"alpha": 0.5, "beta": 0.5}}, headers=ADMIN)  # run time: the same
        assert r.status_code == 400 and "'beta'" in r.json()["error"]["message"]
        assert srv.router.get("ab") == {"alpha": 1.0}
