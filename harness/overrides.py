"""Dotted command-line overrides (``eval.stride=512``) and the strict YAML reading configs,
overrides and registry entries share: a key given twice in one mapping is refused."""

from __future__ import annotations

from typing import Any

import yaml

from .errors import ConfigError, printable


def parse_override(item: str) -> tuple[list[str], Any]:
    """``eval.stride=512`` -> (['eval', 'stride'], 512); values are YAML scalars or lists."""
    if "=" not in item:
        raise ConfigError([f"override '{printable(item)}': expected KEY=VALUE, e.g. eval.stride=512"])
    key, _, raw = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError([f"override '{printable(item)}': empty key part"])
    try:
        value = safe_load_unique(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as err:
        if "given twice" in str(getattr(err, "problem", "")):
            raise ConfigError([f"override '{printable(item)}': {err.problem}"]) from None
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a nested mapping (a copy); missing sections are created."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError([f"override '{printable(item)}': {printable(part)} is not a section"])
            node = nxt
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            _merge_into(node[parts[-1]], value)  # eval={max_length: 8} sets one key, keeps the file's others
        else:
            node[parts[-1]] = value
    return data


def _merge_into(node: dict, value: dict) -> None:
    for key, item in value.items():
        if isinstance(item, dict) and isinstance(node.get(key), dict):
            _merge_into(node[key], item)
        else:
            node[key] = item


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping holding one key twice (YAML keeps the last,
    silently: ``stride: 8`` then ``stride: 16`` ran with 16)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice (lines {seen[key]} and {key_node.start_mark.line + 1}); keep one",
                    key_node.start_mark)
            seen.setdefault(key, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep)


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load``, refusing a key given twice in one mapping."""
    return yaml.load(text, Loader=_UniqueKeyLoader)
