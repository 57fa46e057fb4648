"""`load_yaml`: YAML as every config of codistill is read — PyYAML's safe loader, except that a
key given twice in one mapping is an error naming the key and both lines.

PyYAML (like most loaders) lets the last of two equal keys win without a word, so a second
`train:` section wipes every setting of the first. A merge key (`<<: *defaults`) may still be
overridden by an explicit key: that is what a merge is for."""

from __future__ import annotations

import yaml


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping with one key twice; its `problem` and `problem_mark` say which and where, as
    every PyYAML error's do (so the callers' one-line formatting applies unchanged)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_at = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first_at.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error says so below
                    continue
                if seen is not None:
                    raise DuplicateKeyError(
                        "while reading a mapping", node.start_mark,
                        f"duplicate key {key!r} (first given at line {seen.line + 1}; a key may be given once)",
                        key_node.start_mark)
                first_at[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str | bytes):
    """`yaml.safe_load`, refusing a key given twice in one mapping (`DuplicateKeyError`)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 — a SafeLoader subclass
