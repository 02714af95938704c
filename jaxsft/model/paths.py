"""Parameter paths: the one spelling of where a param sits in the tree, "blocks/attn/q_proj".

Every module that names params by string (freeze regexes, LoRA targets, the Hugging Face
tensor map, adapters, shardings) goes through these functions, so a path reads the same
in a config, an error message and the code.

Contract:
    flatten(tree) -> {path: leaf};  unflatten(flat) -> tree       nested dicts <-> slash paths
    get(tree, path) -> node;  put(tree, path, value)               one node, parents made on demand
"""

from __future__ import annotations

from flax import traverse_util

SEP = "/"


def flatten(tree: dict) -> dict[str, object]:
    """{"blocks/attn/q_proj": leaf, ...}; every non-dict node (array, shape, PartitionSpec, None) is a leaf."""
    return traverse_util.flatten_dict(tree, sep=SEP)


def unflatten(flat: dict[str, object]) -> dict:
    return traverse_util.unflatten_dict(flat, sep=SEP)


def get(tree, path: str):
    for key in path.split(SEP):
        tree = tree[key]
    return tree


def put(tree: dict, path: str, value) -> None:
    *parents, last = path.split(SEP)
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[last] = value
