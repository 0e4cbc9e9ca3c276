"""Every key in ``configs/base.py`` is read by the code, and saved configs upgrade in one place.

A key that nothing reads is a setting a user can change to no effect, so this test
fails on one. Reads are found statically in ``vdiff/`` and ``data_pipelines/``:
``<section>.<key>`` through a chain (``config.vae.steps``) or an alias of the section
(``t = config.train; t.lr``); for a key whose name no other section uses, or of a
section handed whole to a function (``VideoVAE.from_config(config.vae)``), any
read of that name from a config (``vae_config.train_crop``, ``m.width`` after
``m = model_cfg``). Names read from records or other objects (``rec.key``) do not count. A
key of a section handed whole to a function still passes when its name is read from any
config (a ``vae.fps`` would pass on ``config.data.fps``): the check is static.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import ml_collections
import pytest

from vdiff.config import ADDED_KEYS, _all_keys, base_config, upgrade_config

ROOT = Path(__file__).resolve().parent.parent
CODE = sorted([*ROOT.glob("vdiff/**/*.py"), *ROOT.glob("data_pipelines/**/*.py")])
# Groups whose keys are names, read by iterating over a list of them (mesh axes).
OPEN_GROUPS = ("mesh.shape", "mesh.dcn_shape")


def _chain(node: ast.AST) -> list[str]:
    """``a.b.c`` -> ["a", "b", "c"] (empty when the chain does not start at a name)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return parts[::-1]
    return []


def _configish(chain: list[str], aliases: dict[str, set[str]]) -> bool:
    """Whether an attribute chain reads a config: it passes through a name that says so
    (``config``, ``cfg``, ``vae_config``) or through an alias of a section (``d``, ``t``)."""
    return chain[0] in aliases or any("config" in part or "cfg" in part for part in chain)


def code_reads(sections: set[str]) -> tuple[set[str], set[str], set[str], set[str]]:
    """(``section.key`` reads resolved through chains and aliases; names read as an
    attribute, a subscript or through ``getattr`` / ``.get``; strings listed in tuples and
    lists; the sections handed whole to a function, e.g. ``VideoVAE.from_config(config.vae)``)."""
    resolved: set[str] = set()
    names: set[str] = set()
    strings: set[str] = set()
    passed: set[str] = set()
    for path in CODE:
        tree = ast.parse(path.read_text())
        aliases: dict[str, set[str]] = {}
        for node in ast.walk(tree):  # `d = config.data`, `d, t = config.data, config.train`
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                pairs = [(node.targets[0], node.value)]
                if isinstance(node.targets[0], ast.Tuple) and isinstance(node.value, ast.Tuple):
                    pairs = list(zip(node.targets[0].elts, node.value.elts))
                for target, value in pairs:
                    chain = _chain(value.body if isinstance(value, ast.IfExp) else value)
                    if isinstance(target, ast.Name) and chain and chain[-1] in sections:
                        aliases.setdefault(target.id, set()).add(chain[-1])
                    elif isinstance(target, ast.Name) and chain and _configish(chain, {}):
                        aliases.setdefault(target.id, set())  # `m = model_cfg`: a config
            elif isinstance(node, ast.Call):
                for arg in [*node.args, *(k.value for k in node.keywords)]:
                    chain = _chain(arg)
                    if len(chain) >= 2 and chain[-1] in sections:
                        passed.add(chain[-1])
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                chain = _chain(node)
                if chain and _configish(chain[:-1], aliases):
                    names.add(node.attr)
                if len(chain) >= 2:
                    for owner in aliases.get(chain[-2]) or {chain[-2]}:
                        resolved.add(f"{owner}.{chain[-1]}")
            elif isinstance(node, ast.Subscript):  # `config.mesh.shape["data"]`
                chain = _chain(node.value)
                if chain and _configish(chain, aliases) and isinstance(node.slice, ast.Constant):
                    names.add(str(node.slice.value))
            elif isinstance(node, ast.Call) and node.args:  # `getattr(x, "key")`, `x.get("key")`
                name = (
                    node.func.attr
                    if isinstance(node.func, ast.Attribute)
                    else getattr(node.func, "id", "")
                )
                if name == "getattr" and len(node.args) > 1:
                    owner, arg = _chain(node.args[0]), node.args[1]
                elif name == "get" and isinstance(node.func, ast.Attribute):
                    owner, arg = _chain(node.func.value), node.args[0]
                else:
                    continue
                if owner and _configish(owner, aliases) and isinstance(arg, ast.Constant):
                    names.add(str(arg.value))
            if isinstance(node, (ast.Tuple, ast.List)):  # name lists such as MESH_AXES
                strings.update(
                    e.value
                    for e in node.elts
                    if isinstance(e, ast.Constant) and isinstance(e.value, str)
                )
    return resolved, names, strings, passed


def unread_keys(base: ml_collections.ConfigDict) -> list[str]:
    groups = [k for k in _all_keys(base) if isinstance(_get(base, k), ml_collections.ConfigDict)]
    keys = [k for k in _all_keys(base) if k not in groups]
    sections = {k.split(".")[-1] for k in groups}
    resolved, names, strings, passed = code_reads(sections)
    leaf_count: dict[str, int] = {}
    for k in keys:
        leaf_count[k.split(".")[-1]] = leaf_count.get(k.split(".")[-1], 0) + 1
    unread = []
    for key in keys:
        group, _, leaf = key.rpartition(".")
        owner = group.split(".")[-1] if group else ""
        if group in OPEN_GROUPS:  # read by iterating over a list of the names
            ok = owner in names and leaf in strings
        elif not group:  # a top-level key: `config.seed`
            ok = any(r.endswith(f".{leaf}") and r.split(".")[0] not in sections for r in resolved)
        else:
            ok = f"{owner}.{leaf}" in resolved or (
                (leaf_count[leaf] == 1 or owner in passed) and leaf in names
            )
        if not ok:
            unread.append(key)
    return unread


def _get(config, key):
    for part in key.split("."):
        config = config[part]
    return config


def test_every_base_key_is_read_by_the_code():
    assert unread_keys(base_config()) == []


def test_the_check_finds_a_key_that_nothing_reads():
    base = base_config()
    base.vae.chunk_frames_unused = 8  # a unique name that no code reads
    base.train.shuffle_seed = 0
    # Names that other code reads from records, clips and skip entries, never from a config.
    base.train.key, base.data.caption, base.diffusion.reason = 0, "", ""
    assert sorted(unread_keys(base)) == [
        "data.caption", "diffusion.reason", "train.key", "train.shuffle_seed",
        "vae.chunk_frames_unused",
    ]  # fmt: skip


def test_old_workdir_config_gets_the_keys_added_since():
    saved = json.loads(base_config().to_json())
    for key in ADDED_KEYS:
        group, leaf = key.split(".")
        del saved[group][leaf]
    saved["vae"]["chunk_frames"] = 8  # a key that vdiff no longer has
    del saved["train"]["log_every"]  # a key without an entry in ADDED_KEYS: the default
    config = upgrade_config(saved)
    for key, old in ADDED_KEYS.items():
        assert _get(config, key) == old, key
    # The value that reproduces the old run, not today's default.
    assert config.diffusion.p_no_cross_modal == 0.0 != base_config().diffusion.p_no_cross_modal
    assert "chunk_frames" not in config.vae
    assert config.train.log_every == base_config().train.log_every
    assert config.data.buckets == tuple(tuple(b) for b in base_config().data.buckets)
    assert sorted(_all_keys(config)) == sorted(_all_keys(base_config()))


@pytest.mark.parametrize("key", sorted(ADDED_KEYS))
def test_added_keys_exist_in_base(key):
    assert not isinstance(_get(base_config(), key), ml_collections.ConfigDict)
