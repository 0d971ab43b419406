"""The machinery under the typed configs: documented fields, validation of raw YAML mappings against dataclass
schemas (unknown keys name the closest valid one; wrong types and out-of-range values name the key and what was
expected), `--set` overrides, and output (dict, YAML, the rows of `llmft schema`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from llmft.errors import ConfigError


def opt(default: Any, help: str, *, gt: float | None = None, ge: float | None = None,
        lt: float | None = None, le: float | None = None) -> Any:
    """A config field with documentation and an optional numeric range."""
    meta = {"help": help, "gt": gt, "ge": ge, "lt": lt, "le": le}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


REQUIRED = dataclasses.MISSING


class YAMLSyntaxError(ConfigError):
    pass


MAX_ALIASES = 64  # YAML aliases in one config: a few are handy, thousands are an alias bomb
MAX_NODES = 20_000  # values in one config once aliases are expanded


class ConfigLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses duplicate keys (the last one would win in silence) and alias bombs (a few lines
    that expand into billions of values), naming the line."""

    def __init__(self, stream):
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise ConfigError(f"{self.name}:{mark.line + 1}: more than {MAX_ALIASES} YAML aliases (*name): "
                                  f"refusing to expand them (an alias bomb?)")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:  # the mapping's own keys: a key may override one merged in by `<<: *base`
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise ConfigError(f"{self.name}:{key_node.start_mark.line + 1}: duplicate key '{short(key)}' (the "
                                      f"last value would silently replace the first); keep one")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml_text(text: str, name: str) -> Any:
    """Parse YAML with ConfigLoader; syntax errors name the file, line and column."""
    loader = None
    try:
        loader = ConfigLoader(text)  # its reader refuses control characters already here
        loader.name = name
        data = loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise YAMLSyntaxError(f"{loc}: YAML syntax error: {problem}") from None
    finally:
        if loader is not None:
            loader.dispose()
    if count_nodes(data, MAX_NODES) > MAX_NODES:
        raise ConfigError(f"{name}: more than {MAX_NODES} values once its aliases are expanded: refusing it")
    return data


def count_nodes(x: Any, budget: int) -> int:
    """Values in a parsed document, counting shared (aliased) ones each time; stops counting past `budget`."""
    stack, n = [x], 0
    while stack and n <= budget:
        item = stack.pop()
        n += 1
        if isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            stack += item
    return n


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" if not path.exists() else f"config {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    raw = load_yaml_text(text, str(path))
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    return raw


def short(value: Any, width: int = 60) -> str:
    """A value for an error message: its repr, cut to `width` characters (a config value can be huge)."""
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= width else text[:width - 1] + "…"


def apply_override(raw: dict, item: str, schema: type) -> None:
    """Apply one `--set a.b=value` to the raw config dict (value parsed as YAML)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.learning_rate=1e-4")
    parts = key.split(".")
    check_key_path(schema, parts, where=f"--set {item}")
    try:
        value = load_yaml_text(text, f"--set {key}") if text.strip() else None
    except YAMLSyntaxError:  # not YAML: the text itself
        value = text
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def check_key_path(schema: type, parts: list[str], where: str) -> None:
    cls = schema
    for i, part in enumerate(parts):
        if typing.get_origin(cls) is dict:  # a free-form mapping (judges' weights, llmft loop's train): its keys
            return                          # are checked where they are read
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            raise ConfigError(f"{where}: {unknown_key_message(schema, parts[:i], part)}")
        cls = resolved_hints(cls)[part]


def unknown_key_message(schema: type, parent: list[str], key: str) -> str:
    full = ".".join([*parent, key])
    cls = schema
    for p in parent:
        cls = resolved_hints(cls)[p]
    siblings = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    if close:
        hint = ".".join([*parent, close[0]])
    else:  # the right name in the wrong section, e.g. `learning_rate` at the top level
        hint = next((p for p in all_key_paths(schema) if p.split(".")[-1] == key), None)
        if hint is None:
            leaves = {p.split(".")[-1]: p for p in all_key_paths(schema)}
            close = difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.75)
            hint = leaves[close[0]] if close else None
    suggestion = f" (did you mean '{hint}'?)" if hint else ""
    return f"unknown key '{full}'{suggestion}"


def all_key_paths(schema: type, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(schema):
        t = resolved_hints(schema)[f.name]
        path = prefix + f.name
        out += all_key_paths(t, path + ".") if dataclasses.is_dataclass(t) else [path]
    return out


# -------------------------------------------------------------------------------------------- validation
def build(cls: type, raw: Any, where: str, prefix: str = "", root: type | None = None, defaults: Any = None) -> Any:
    """Turn a raw mapping into the dataclass `cls`, validating every key (`root`: the stage schema).
    Keys left out take their values from `defaults` (a stage's own defaults for a section) or from `cls`."""
    root = root or cls
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or '<top>'}' must be a mapping of keys, "
                          f"got {type(raw).__name__}")
    hints = resolved_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            parent = [p for p in prefix.rstrip(".").split(".") if p]
            raise ConfigError(f"{where}: {unknown_key_message(root, parent, short(str(key)))}")
    values = {}
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        own_defaults = f.default_factory not in (dataclasses.MISSING, hints[f.name])  # e.g. lambda: LoraConfig(...)
        section = f.default_factory() if own_defaults else None
        if f.name in raw:
            values[f.name] = check_value(hints[f.name], raw[f.name], path, where, f.metadata, root, section)
        elif dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = build(hints[f.name], {}, where, path + ".", root, section)
        elif defaults is not None:
            values[f.name] = getattr(defaults, f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key '{path}' ({f.metadata.get('help', '')})")
    return cls(**values)


def check_value(tp: Any, value: Any, path: str, where: str, meta: Any, root: type, section: Any = None) -> Any:
    if dataclasses.is_dataclass(tp):
        return build(tp, value if value is not None else {}, where, path + ".", root, section)
    ok, converted = coerce(tp, value)
    if not ok:
        raise ConfigError(f"{where}: '{path}' expects {describe(tp)}, got {short(repr(value))}")
    check_range(converted, path, where, meta)
    return converted


def coerce(tp: Any, value: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = coerce(arg, value)
            if ok:
                return True, v
        return False, None
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            return False, None
        items = [(coerce(key_tp, k), coerce(value_tp, v)) for k, v in value.items()]
        return all(k[0] and v[0] for k, v in items), {k[1]: v[1] for k, v in items}
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            return False, None
        items = [coerce(item, v) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if tp is type(None):
        return value is None, None
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `2e-4` as a string
            try:
                value = float(value)
            except ValueError:
                return False, None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, None
    if tp is str:
        return isinstance(value, str), value
    if tp is Any:  # free-form YAML (an environment's keyword arguments)
        return True, value
    return False, None


MAX_INT = 2**31 - 1  # every count, size and seed fits; a larger number is a typo (and overflows later)


def describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {describe(typing.get_args(tp)[0])}s"
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        return f"a mapping of {describe(key_tp)} to {describe(value_tp)}"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number",
            str: "a string"}.get(tp, str(tp))


_BOUNDS = (("gt", ">", lambda v, b: v > b), ("ge", ">=", lambda v, b: v >= b),
           ("lt", "<", lambda v, b: v < b), ("le", "<=", lambda v, b: v <= b))


def range_text(meta: Any) -> str:
    return " and ".join(f"{sym} {meta[k]}" for k, sym, _ in _BOUNDS if meta.get(k) is not None)


def check_range(value: Any, path: str, where: str, meta: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if not math.isfinite(value) or abs(value) > MAX_INT:  # inf and nan pass every range test; 1e30 overflows later
        raise ConfigError(f"{where}: '{path}' must be a finite number of magnitude at most {MAX_INT}, got "
                          f"{short(value)}")
    if any(meta.get(k) is not None and not test(value, meta[k]) for k, _, test in _BOUNDS):
        raise ConfigError(f"{where}: '{path}' must be {range_text(meta)}, got {value}")


_HINTS: dict[type, dict] = {}


def resolved_hints(cls: type) -> dict:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


# ---------------------------------------------------------------------------------------------- output
def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differing_keys(a: dict, b: dict, ignore: set[str]) -> list[str]:
    fa, fb = flatten(a), flatten(b)
    return sorted(k for k in set(fa) | set(fb) if k not in ignore and fa.get(k) != fb.get(k))


def schema_rows(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every leaf key, for `llmft schema`."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = resolved_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows += schema_rows(tp, prefix + f.name + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        rng = range_text(f.metadata)
        rows.append((prefix + f.name, describe(tp) + (f" {rng}" if rng else ""), default,
                     f.metadata.get("help", "")))
    return rows
