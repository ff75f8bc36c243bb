"""The option grammar every runner shares (``train.py``, the GLUE and the instruction runners).

A YAML ``--config`` sets the argparse defaults and the command line overrides them. ``--config`` takes a path, or
the name of a config that ships with neat-vision (``demo``, ``glue/cola_neat_l``, ``studies/depth``: see
`find_config`). A config may start with
``base: other.yaml`` (a path relative to the file) to inherit that file's values; a later file overrides an
earlier one key by key, and the ``neat`` fields one by one. Keys are an option's long names with underscores,
any spelling the option accepts (``lr_adapter`` and ``lr`` name one option); ``neat: {rank: 4}`` is
``neat_rank: 4``, as ``--neat rank=4`` is ``--neat-rank 4``. Two spellings of one option in one file, or on
one command line, fail naming both. Unknown keys fail with the closest valid names. Values are converted and
checked as the command line would when the file is read (PyYAML reads ``5e-3`` as a string), so a bad value
in a file fails before anything is built, even where the command line overrides it.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigFileError",
    "block_indices",
    "did_you_mean",
    "find_config",
    "option_differences",
    "option_keys",
    "packaged_configs",
    "read_layers",
    "read_values",
    "settle_command_line",
    "split_names",
]

_KINDS = {"int": "an integer", "float": "a number", "_mapping": "a mapping", "_probability": "a probability"}


class ConfigFileError(ValueError):
    """A YAML config holds an unknown key, an unreadable value or a broken ``base:`` chain."""


def did_you_mean(word: str, choices: Iterable[str], cutoff: float = 0.5) -> str:
    """``'; did you mean a, b?'`` for the names in ``choices`` close to ``word``, else ``''``."""
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=cutoff)
    return f"; did you mean {', '.join(close)}?" if close else ""


def packaged_configs() -> Path:
    """The folder of the configs that ship with neat-vision: ``neat_vision/configs`` (in a checkout a link to
    the top-level ``configs/``; in a wheel the files themselves)."""
    package = Path(__file__).resolve().parents[1]
    folder = package / "configs"
    if not folder.is_dir():  # a checkout made without symbolic links (git core.symlinks=false)
        folder = package.parent / "configs"
    return folder


def find_config(name: str | os.PathLike[str]) -> Path:
    """The YAML file that a runner's ``--config`` names: a path when that file exists, else a config shipped
    with neat-vision, named by its path under `packaged_configs` with or without ``.yaml`` (``demo``,
    ``glue/cola_neat_l``, ``studies/depth.yaml``; a leading ``configs/`` is allowed, so a checkout's
    ``configs/demo.yaml`` also works from any folder). A path that exists wins. Neither: `ConfigFileError`
    with the closest shipped names."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    text = os.fspath(name)
    if path.exists():
        raise ConfigFileError(f"config {text} is not a file")
    if path.is_absolute():
        raise ConfigFileError(f"config file {text} not found")
    folder = packaged_configs()
    relative = path.as_posix().removeprefix("configs/")
    for candidate in (relative, f"{relative}.yaml"):
        file = (folder / candidate).resolve()
        if file.is_file() and file.suffix in (".yaml", ".yml") and file.is_relative_to(folder.resolve()):
            return file
    names = sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))
    stem = relative.removesuffix(".yaml")
    close = [n for n in names if n.rsplit("/", 1)[-1] == stem.rsplit("/", 1)[-1]]
    close += [n for n in difflib.get_close_matches(stem, names, n=4, cutoff=0.6) if n not in close]
    hint = f"; did you mean {', '.join(close[:4])}?" if close else ""
    raise ConfigFileError(
        f"config file {text} not found: no such file, and no config of that name ships with neat-vision{hint} "
        f"(the shipped configs, named like demo or glue/cola_neat_l, are in {folder})"
    )


def read_layers(path: str | Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """The files of a config's ``base:`` chain, the root base first, each with its mapping (``base`` removed).

    The root ``path`` is a file or a shipped config's name (`find_config`); ``base:`` is a path relative to
    the file that holds it.
    """
    path = (find_config(path) if not seen else Path(path)).resolve()
    if path in seen:
        chain = " -> ".join(str(s) for s in (*seen, path))
        raise ConfigFileError(f"config inheritance loops: {chain}")
    if not path.is_file():
        where = f" (base of {seen[-1]})" if seen else ""
        raise ConfigFileError(f"config file {path} not found{where}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigFileError(f"{path}: not valid YAML ({problem}{where})") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigFileError(f"{path}: cannot read the config ({err})") from err
    if not isinstance(data, Mapping):
        raise ConfigFileError(f"{path}: a config must be a YAML mapping of option: value, got {type(data).__name__}")
    data = dict(data)
    base = data.pop("base", None)
    if base is None:
        return [(path, data)]
    if not isinstance(base, str):
        raise ConfigFileError(f"{path}: base must be a path to another YAML file, got {base!r}")
    return [*read_layers(path.parent / base, (*seen, path)), (path, data)]


def option_keys(parser: argparse.ArgumentParser, skip: Iterable[str] = ()) -> dict[str, argparse.Action]:
    """Every YAML key of ``parser``: each long option name with underscores, and each destination."""
    skip = {"help", "config", "neat_overrides", *skip}
    keys: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in skip:
            continue
        keys[action.dest] = action
        for flag in action.option_strings:
            if flag.startswith("--"):
                keys.setdefault(flag[2:].replace("-", "_"), action)
    return keys


def convert(action: argparse.Action, key: str, value: Any, where: Path | str) -> Any:
    """``value`` read from a file for ``action``, converted and checked as argparse would on the command line."""

    def fail(allowed: str) -> ConfigFileError:
        return ConfigFileError(f"{where}: {key}={value!r} is not allowed: {allowed}")

    if value is None:
        return None
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if isinstance(action, argparse._StoreConstAction):  # e.g. nargs='?' flags are _StoreAction, not this
        raise fail("a flag: give it on the command line")
    many = action.nargs not in (None, "?")
    items = value if isinstance(value, list) and many else [value]
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        raise fail(f"a list of {action.nargs} values")
    kind = _KINDS.get(getattr(action.type, "__name__", ""), "a string")
    out = []
    for item in items:
        if isinstance(item, bool) or (action.type is int and isinstance(item, float) and not item.is_integer()):
            raise fail(kind)
        try:
            out.append(action.type(item) if action.type is not None else str(item))
        except argparse.ArgumentTypeError as err:
            raise fail(str(err)) from err
        except (TypeError, ValueError) as err:
            raise fail(f"{kind} ({err})") from err
    if action.choices is not None and any(v not in action.choices for v in out):
        raise fail(f"one of {', '.join(map(str, action.choices))}")
    return out if many else out[0]


def read_values(
    path: str | Path,
    parser: argparse.ArgumentParser,
    skip: Iterable[str] = (),
    check: Callable[[str, Any], str | None] | None = None,
    spellings: dict[str, tuple[Path, str]] | None = None,
) -> dict[str, Any]:
    """The option values (by destination) a config and its ``base:`` chain set, converted and checked.

    ``neat: {FIELD: value}`` becomes the key ``neat_FIELD``; keys set only by ``parser.set_defaults`` (not
    options) pass as they are; ``check(dest, value)`` says what is allowed when a value is out of range (else
    ``None``). Every error names the key as the file spells it (``lr: -1`` is ``lr``, not its destination
    ``lr_neat``; ``neat: {rank: 0}`` is ``neat.rank``). ``spellings``, when given, receives per destination the
    file and the key that set it last, so later checks can name them too.
    """
    keys = option_keys(parser, skip)
    plain = {k for k in parser._defaults if k not in keys}
    merged: dict[str, Any] = {}
    for where, data in read_layers(path):
        spelled: dict[str, str] = {}
        for key, value, written in _expand_neat(data, where):
            if key in plain:
                dest = key
            elif key in keys:
                dest = keys[key].dest
                value = convert(keys[key], written, value, where)
                allowed = check(dest, value) if check is not None and value is not None else None
                if allowed is not None:
                    raise ConfigFileError(f"{where}: {written}={value!r} is not allowed: {allowed}")
            else:
                raise ConfigFileError(
                    f"{where}: unknown key {key!r}{did_you_mean(key, [*keys, *plain])} "
                    "(keys are option names with underscores)"
                )
            if dest in spelled:
                raise ConfigFileError(f"{where}: {spelled[dest]} and {key} set the same option: keep one")
            spelled[dest] = key
            merged[dest] = value
            if spellings is not None:
                spellings[dest] = (where, written)
    return merged


def _expand_neat(data: Mapping[str, Any], where: Path) -> list[tuple[str, Any, str]]:
    """``(key, value, spelling)`` per setting: ``neat: {rank: 4}`` is ``("neat_rank", 4, "neat.rank")``."""
    items = []
    for key, value in data.items():
        if key != "neat":
            items.append((str(key), value, str(key)))
            continue
        if not isinstance(value, Mapping):
            allowed = "a mapping of NeatConfig fields, e.g. {rank: 8}"
            raise ConfigFileError(f"{where}: neat={value!r} is not allowed: {allowed}")
        items.extend((f"neat_{field}", field_value, f"neat.{field}") for field, field_value in value.items())
    return items


def _flags_given(argv: Sequence[str]) -> list[str]:
    """The option strings ``argv`` uses, in order (``--lr=1`` gives ``--lr``), up to a ``--``."""
    tokens = argv[: list(argv).index("--")] if "--" in argv else argv
    return [t.split("=", 1)[0] for t in tokens]


def settle_command_line(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Refuse an option given in two spellings; apply each ``--neat FIELD=VALUE`` to ``args.neat_FIELD``.

    Then ``neat_targets`` is split into names (``q,v`` -> ``q``, ``v``) and ``neat_layers`` read as block indices.
    """
    given = _flags_given(argv)
    for action in parser._actions:
        if isinstance(action, argparse.BooleanOptionalAction):  # --x --no-x: the last wins, as argparse does
            continue
        used = sorted(set(given) & set(action.option_strings))
        if len(used) > 1:
            parser.error(f"{' and '.join(used)} set the same option ({action.dest}): keep one")
    keys = option_keys(parser)
    fields = sorted(k[5:] for k in {*keys, *parser._defaults} if k.startswith("neat_") and k != "neat_overrides")
    for item in args.neat_overrides:
        field, sep, text = item.partition("=")
        field = field.strip()
        if not sep or not field:
            parser.error(f"--neat {item!r} is not allowed: FIELD=VALUE (e.g. --neat rank=8)")
        if field not in fields:
            parser.error(
                f"--neat {field}: {field!r} is not a NeatConfig field{did_you_mean(field, fields)} "
                f"(allowed fields: {', '.join(fields)})"
            )
        value = yaml.safe_load(text)
        action = keys.get(f"neat_{field}")
        if action is not None:
            flags = [f for f in given if f in action.option_strings]
            if flags:
                parser.error(f"--neat {field}=... and {flags[-1]} set the same option (neat_{field}): keep one")
            try:
                value = convert(action, f"neat_{field}", value, "--neat")
            except ConfigFileError as err:
                parser.error(str(err))
        setattr(args, f"neat_{field}", value)
    del args.neat_overrides
    if isinstance(getattr(args, "neat_targets", None), (list, tuple)):
        args.neat_targets = split_names(args.neat_targets)
    if getattr(args, "neat_layers", None) is not None:
        try:
            args.neat_layers = block_indices(args.neat_layers)
        except (TypeError, ValueError):
            parser.error(f"neat_layers={args.neat_layers!r} is not allowed: block indices (4 5 6, 4-11, 0,2) or all")


def option_differences(saved: Mapping[str, Any], current: Mapping[str, Any], ignore: Iterable[str] = ()) -> str:
    """``'key: checkpoint A, now B; ...'`` for every option a resumed run changes (``''`` when none does)."""
    keys = sorted((set(saved) | set(current)) - set(ignore))
    return "; ".join(
        f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)
    )


def split_names(values: Sequence[Any]) -> list[str]:
    """Names given as separate values or in one, separated by commas or spaces (``['q,v', 'mlp']``)."""
    return [t for v in values for t in re.split(r"[,\s]+", str(v).strip()) if t]


def block_indices(values: Sequence[Any] | Any) -> list[int] | None:
    """``['all']`` -> ``None``; ints and strings like ``4-11`` or ``0,2,4`` -> sorted block indices.

    Raises ``ValueError`` naming the token that is none of these.
    """
    tokens = split_names(values if isinstance(values, (list, tuple)) else [values])
    if [t.lower() for t in tokens] == ["all"]:
        return None
    out: set[int] = set()
    for token in tokens:
        span = re.fullmatch(r"(\d+)-(\d+)", token)
        if span:
            out.update(range(int(span[1]), int(span[2]) + 1))
        elif token.isdigit():
            out.add(int(token))
        else:
            raise ValueError(token)
    return sorted(out)
