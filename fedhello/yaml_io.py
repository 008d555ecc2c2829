"""YAML reading that refuses what PyYAML lets pass silently: a key given twice in one mapping.

PyYAML's ``safe_load`` keeps the last of two equal keys, so a config that sets ``rounds`` twice
runs with whichever came second. ``safe_load_strict`` raises ``DuplicateKeyError`` naming the key
(dotted from the top) and both lines instead.
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["DuplicateKeyError", "safe_load_strict"]


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that gives one key twice; ``key`` is its dotted path."""

    def __init__(self, key: str, first_line: int, second_line: int) -> None:
        self.key, self.lines = key, (first_line, second_line)
        super().__init__(None, None, f"{key}: given twice (lines {first_line} and {second_line}); keep one")

    def __str__(self) -> str:  # the plain message, without PyYAML's marks
        return self.problem


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor": keys given after it override it
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(_dotted(self, key_node, key), seen[key], line)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _dotted(loader: _StrictLoader, key_node: yaml.Node, key: Any) -> str:
    """The dotted path of ``key``: the keys of the mappings that contain its node, outermost first."""
    path: list[str] = []

    def find(node: yaml.Node, trail: list[str]) -> bool:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k is key_node:
                    path.extend(trail)
                    return True
                if find(v, trail + [str(getattr(k, "value", k))]):
                    return True
        elif isinstance(node, yaml.SequenceNode):
            return any(find(v, trail[:-1] + [f"{trail[-1]}[{i}]"] if trail else [f"[{i}]"])
                       for i, v in enumerate(node.value))
        return False

    root = getattr(loader, "_strict_root", None)
    if root is not None:
        find(root, [])
    return ".".join([*path, str(key)])


def safe_load_strict(text: str) -> Any:
    """``yaml.safe_load(text)``, but a mapping with a key given twice raises ``DuplicateKeyError``."""
    loader = _StrictLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        loader._strict_root = root
        return loader.construct_document(root)
    finally:
        loader.dispose()
