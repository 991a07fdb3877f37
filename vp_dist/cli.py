"""Command lines and config files from typed dataclasses, checked by pydantic.

The schema is the plain dataclasses (`RunConfig`, `VPConfig`, `FinetuneConfig`, ...): a field's
type comes from its annotation, its default from the dataclass, its meaning from
`field(metadata={"help": ...})`, else from the `# comment` after it, else from a `name: text`
entry in the class docstring. `pydantic.TypeAdapter` validates a nested mapping against them in
lax mode, so the YAML string '1e-4' becomes a float and `--vp.alpha 1e-1` works, while a bad
value is reported with its dotted path. Nothing here knows the fields: a field added to a
dataclass is a flag, is validated and shows in `--help` as soon as it exists.

    parse_command_line(FinetuneConfig, argv, prog="finetune.py", description=__doc__)

Errors go to stderr as `prog: error: <field>: <problem>` with exit status 2, no traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import json
import re
import sys
import tokenize
import types
import typing
from typing import Any, Callable

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

GENERIC_HELP = "(no description yet)"
_NONE_WORDS = ("null", "none", "~")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names the field."""


# --- the schema ----------------------------------------------------------------------------------

def _strip_optional(kind) -> tuple[Any, bool]:
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return kind, False


def _is_dataclass_type(kind) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def list_item_class(kind):
    """The dataclass of a `list[SomeDataclass]` field, else None."""
    if typing.get_origin(kind) is list and typing.get_args(kind) and _is_dataclass_type(typing.get_args(kind)[0]):
        return typing.get_args(kind)[0]
    return None


def type_name(kind) -> str:
    """`int`, `str | None`, `list[PhaseSpec]`, `tuple[float, ...]`: the annotation, short."""
    inner, optional = _strip_optional(kind)
    args = typing.get_args(inner)
    if args and typing.get_origin(inner) not in (typing.Union, types.UnionType):
        name = f"{typing.get_origin(inner).__name__}[{', '.join('...' if a is Ellipsis else type_name(a) for a in args)}]"
    elif isinstance(inner, type):
        name = inner.__name__
    else:
        name = str(inner).replace("typing.", "")
    return f"{name} | None" if optional else name


@functools.lru_cache(maxsize=None)
def _source_help(cls) -> dict[str, str]:
    """`name: text` from the trailing `# comments` of the class body, then from its docstring."""
    found: dict[str, str] = {}
    doc = inspect.getdoc(cls) or ""
    current = None
    for line in doc.splitlines():
        match = re.match(r"^(\w+):\s+(.*)$", line)
        if match:
            current = match.group(1)
            found[current] = match.group(2).strip()
        elif current and line.startswith(" ") and line.strip():
            found[current] += " " + line.strip()
        else:
            current = None
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return found
    lines = source.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, col = token.start
            match = re.match(r"^\s+(\w+)\s*:", lines[row - 1][:col])
            if match:
                found[match.group(1)] = token.string.lstrip("#").strip()
    return found


def field_help(cls, field: dataclasses.Field) -> str:
    return field.metadata.get("help") or _source_help(cls).get(field.name) or GENERIC_HELP


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One settable field: `path` is dotted (`vp.alpha`); `owner` is the dataclass that holds it."""

    path: str
    kind: Any
    default: Any
    help: str
    owner: type


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def settable_fields(cls, prefix: str = "", hidden: frozenset = frozenset()) -> list[Leaf]:
    """Every field of `cls` and of its nested dataclasses, depth first; `hidden` paths are left out.

    A nested dataclass is listed as a whole (`vp`, a mapping) and field by field (`vp.alpha`);
    a `list[Dataclass]` (`phases`) as a whole only: its items' fields are `item_fields`.
    """
    hints = typing.get_type_hints(cls)
    leaves = []
    for field in dataclasses.fields(cls):
        path = prefix + field.name
        if path in hidden or not field.init:
            continue
        kind = hints[field.name]
        leaves.append(Leaf(path, kind, _default(field), field_help(cls, field), cls))
        if _is_dataclass_type(kind):
            leaves += settable_fields(kind, path + ".", hidden)
    return leaves


def _field_kind(cls, name: str, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if name not in names:
        raise ConfigError(f"{where}: unknown field; {cls.__name__} has {names}")
    return hints[name]


# --- values from text ------------------------------------------------------------------------------

def value_from_text(text: str, kind):
    """A command-line string as the value pydantic will check against `kind`.

    Scalars stay strings (pydantic's lax mode reads '1e-4' as a float, 'true' as a bool, and keeps
    'runs/001' a string); `null`/`none` is None where the type allows it; mappings and lists are
    YAML (`{num_hidden_layers: 4}`), a tuple or list may also be written `0.1,0.2`.
    """
    inner, optional = _strip_optional(kind)
    if optional and text.strip().lower() in _NONE_WORDS:
        return None
    origin = typing.get_origin(inner) or inner
    if origin in (tuple, list) and not text.lstrip().startswith("["):
        return [part.strip() for part in text.split(",") if part.strip()]
    if origin in (dict, list, tuple) or _is_dataclass_type(inner) or inner is Any:
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"cannot read {text!r} as YAML: {error}") from None
    return text


def set_path(values: dict, path: str, text: str, schema) -> None:
    """`values[path] = text` read as the schema's type there; list items by index or by `name`."""
    keys = path.split(".")
    node, cls = values, schema
    for depth, key in enumerate(keys):
        where = ".".join(keys[:depth + 1])
        if isinstance(node, list):
            node = _list_item(node, key, where)
            continue
        declared = _field_kind(cls, key, where)
        kind = _strip_optional(declared)[0]
        if depth == len(keys) - 1:
            try:
                node[key] = value_from_text(text, declared)
            except ConfigError as error:
                raise ConfigError(f"{path}: {error}") from None
            return
        item_class = list_item_class(kind)
        if item_class is not None:
            node = node.setdefault(key, [])
            if not isinstance(node, list):
                raise ConfigError(f"{where}: expected a list, got {node!r}")
            cls = item_class
            if depth == len(keys) - 2:
                raise ConfigError(f"{path}: name a field inside the list item, e.g. {path}.steps")
        elif _is_dataclass_type(kind):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: expected a mapping, got {node!r}")
            cls = kind
        else:
            raise ConfigError(f"{where}: {type_name(kind)} has no field {keys[depth + 1]!r}")


def _list_item(items: list, key: str, where: str):
    if key.isdigit() and int(key) < len(items):
        return items[int(key)]
    for item in items:
        if isinstance(item, dict) and item.get("name") == key:
            return item
    names = [item.get("name") for item in items if isinstance(item, dict)]
    raise ConfigError(f"{where}: no list item {key!r}; items are {names} (or 0..{len(items) - 1})")


def _read_text(path: str, where: str, wanted: str) -> str:
    """The file's text, or a ConfigError "`where`: <why>; pass `wanted`"."""
    try:
        with open(path) as handle:
            return handle.read()
    except OSError as error:
        raise ConfigError(f"{where}: {error.strerror}; pass {wanted}") from None


def read_config_file(path: str) -> dict:
    """A YAML or JSON mapping; missing, unreadable or non-mapping files are a ConfigError."""
    text = _read_text(path, f"config file {path}", "an existing YAML or JSON file")
    try:
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise ConfigError(f"config file {path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                          f"{error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path}: expected a mapping of fields, got {type(values).__name__}")
    return values


def read_json_object(path: str, field: str) -> dict:
    """A JSON object from `path` (e.g. a DeepSpeed config), or a ConfigError naming `field`."""
    where = f"{field}={path!r}"
    text = _read_text(path, where, "an existing file")
    try:
        values = json.loads(text)
    except ValueError as error:
        raise ConfigError(f"{where}: not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(values).__name__}")
    return values


# --- argparse types of the benchmark and tool scripts (`type=`): bad values exit 2 naming the flag ----

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def open_fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be in (0, 1)")
    return value


def positive_int_list(text: str) -> list[int]:
    """`1,2,4`: positive integers, comma-separated."""
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,2,4") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 1, e.g. 1,2,4")
    return values


# argparse names the type in its error ("invalid int value: 'x'"): the value's kind, not the function
for _type, _name in ((positive_int, "int"), (nonnegative_int, "int"), (positive_float, "float"),
                     (open_fraction, "float"), (positive_int_list, "integer list")):
    _type.__name__ = _name


def read_deepspeed_json(path: str, field: str = "deepspeed_config") -> dict:
    """A DeepSpeed config: a JSON object, one of fp16 and bf16 at most, a ZeRO stage DeepSpeed has
    (what DeepSpeed would refuse only after the process group started); ConfigError names `field`."""
    ds = read_json_object(path, field)
    where = f"{field}={path!r}"
    if all((ds.get(key) or {}).get("enabled") is True for key in ("fp16", "bf16")):
        raise ConfigError(f"{where}: enables both fp16 and bf16; keep one")
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage={stage!r} must be 0, 1, 2 or 3")
    return ds


# --- validation ----------------------------------------------------------------------------------

def _forbid_unknown_keys(cls) -> None:
    # pydantic reads a stdlib dataclass's settings from this attribute; unknown keys are errors.
    if "__pydantic_config__" not in vars(cls):
        cls.__pydantic_config__ = ConfigDict(extra="forbid")
    for kind in typing.get_type_hints(cls).values():
        kind = _strip_optional(kind)[0]
        nested = kind if _is_dataclass_type(kind) else list_item_class(kind)
        if nested is not None:
            _forbid_unknown_keys(nested)


@functools.lru_cache(maxsize=None)
def _adapter(cls) -> TypeAdapter:
    _forbid_unknown_keys(cls)
    return TypeAdapter(cls)


def _describe_error(error: dict) -> str:
    where = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if not where:  # the dataclass's own check (__post_init__), which names its fields
        return message
    if error["type"] == "missing":
        return f"{where}: required, give --{where}"
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"{where}: unknown field (see --help for the known ones)"
    if error["type"] == "value_error":
        return f"{where}: {message}"
    return f"{where}: {message} (got {error.get('input')!r})"


def validate(cls, values: dict):
    """An instance of dataclass `cls` from a nested mapping, or a ConfigError naming every bad field."""
    try:
        return _adapter(cls).validate_python(values)
    except ValidationError as error:
        raise ConfigError("; ".join(_describe_error(e) for e in error.errors())) from None


def to_plain(instance) -> dict:
    return _adapter(type(instance)).dump_python(instance, mode="json")


# --- the command line ------------------------------------------------------------------------------

def _default_text(default) -> str:
    if default is dataclasses.MISSING:
        return "required"
    if dataclasses.is_dataclass(default) or (isinstance(default, list) and default
                                              and dataclasses.is_dataclass(default[0])):
        if dataclasses.is_dataclass(default):
            return "see below"
        return f"default: {len(default)} item{'s' if len(default) > 1 else ''} with the field defaults below; " \
               "a YAML/JSON list replaces them"
    return f"default: {default!r}"


def build_parser(schema, *, prog: str, description: str, config_file: bool,
                 hidden: frozenset = frozenset()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if config_file:
        parser.add_argument("--config", metavar="FILE", help="run config, YAML or JSON; flags override it")
    parser.add_argument("--print_config", action="store_true",
                        help="print the resolved configuration as YAML and exit")
    parser.add_argument("--local_rank", help=argparse.SUPPRESS)  # the deepspeed launcher's; ranks come from the env
    parser.add_argument("overrides", nargs="*", metavar="path=value",
                        help="override as an argument, the same as --path value")
    groups: dict[type, argparse._ArgumentGroup] = {}
    for leaf in settable_fields(schema, hidden=hidden):
        group = groups.get(leaf.owner)
        if group is None:
            title = f"fields of {schema.__name__}" if leaf.owner is schema else f"{leaf.path.rsplit('.', 1)[0]} ({leaf.owner.__name__})"
            group = groups[leaf.owner] = parser.add_argument_group(title)
        text = f"[{type_name(leaf.kind)}] {leaf.help} ({_default_text(leaf.default)})".replace("%", "%%")
        inner = _strip_optional(leaf.kind)[0]
        if inner is bool:
            group.add_argument(f"--{leaf.path}", dest=leaf.path, nargs="?", const="true", metavar="BOOL",
                               default=argparse.SUPPRESS, help=text)
            group.add_argument(f"--no-{leaf.path}", dest=leaf.path, action="store_const", const="false",
                               default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            metavar = type_name(leaf.kind).split(" ")[0].split("[")[0].upper()
            group.add_argument(f"--{leaf.path}", dest=leaf.path, metavar=metavar, default=argparse.SUPPRESS,
                               help=text)
        item_class = list_item_class(inner)
        if item_class is not None:
            lines = [f"  --{leaf.path}.<name|index>.{item.path}  [{type_name(item.kind)}] {item.help} "
                     f"({_default_text(item.default)})" for item in settable_fields(item_class)]
            parser.add_argument_group(
                f"{leaf.path} items ({item_class.__name__}), set one item's field by its name or index",
                "\n".join(lines).replace("%", "%%"))
    return parser


def _split_list_item_flags(argv: list[str], list_paths: list[str]) -> tuple[list[str], list[str]]:
    """`--phases.mlm.steps 5` cannot be declared in advance: take such flags out as `path=value`."""
    rest, assignments, index = [], [], 0
    while index < len(argv):
        item = argv[index]
        name = item[2:].split("=", 1)[0] if item.startswith("--") else ""
        if any(name.startswith(path + ".") for path in list_paths):
            if "=" in item:
                assignments.append(item[2:])
            elif index + 1 < len(argv):
                assignments.append(f"{name}={argv[index + 1]}")
                index += 1
            else:
                raise ConfigError(f"--{name} needs a value")
        else:
            rest.append(item)
        index += 1
    return rest, assignments


def fail(prog: str, error: Exception | str) -> typing.NoReturn:
    """The one way a command refuses its input: a message naming the field, status 2."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    sys.exit(2)


def parse_command_line(schema, argv: list[str] | None = None, *, prog: str, description: str = "",
                       config_file: bool = False, hidden: frozenset = frozenset(),
                       finish: Callable[[dict], Any] | None = None):
    """Parse `argv` into `finish(values)` (default: `validate(schema, values)`); exits 2 on bad input.

    values = the `--config` file (if `config_file`), then every `--path value` / `path=value` in
    command-line order. `--print_config` prints the validated result and exits 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(schema, prog=prog, description=description, config_file=config_file, hidden=hidden)
    list_paths = [leaf.path for leaf in settable_fields(schema, hidden=hidden)
                  if list_item_class(_strip_optional(leaf.kind)[0]) is not None]
    try:
        argv, item_assignments = _split_list_item_flags(argv, list_paths)
    except ConfigError as error:
        fail(prog, error)
    args = vars(parser.parse_intermixed_args(argv))
    try:
        values = read_config_file(args.pop("config")) if config_file and args.get("config") else {}
        args.pop("config", None)
        print_config = args.pop("print_config")
        args.pop("local_rank", None)
        positional = args.pop("overrides")
        assignments = [f"{path}={text}" for path, text in args.items()] + positional + item_assignments
        for assignment in assignments:
            if "=" not in assignment:
                raise ConfigError(f"unexpected argument {assignment!r}: overrides look like "
                                  f"--section.key value or section.key=value")
            path, text = assignment.split("=", 1)
            set_path(values, path, text, schema)
        config = (finish or functools.partial(validate, schema))(values)
    except ConfigError as error:
        fail(prog, error)
    if print_config:
        plain = config.to_dict() if hasattr(config, "to_dict") else to_plain(config)
        print(yaml.safe_dump(plain, sort_keys=False), end="")
        sys.exit(0)
    return config
