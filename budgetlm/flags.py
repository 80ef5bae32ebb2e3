"""Command-line flags from the typed config: one set of spelling rules for every verb.

Each verb's settings are a dataclass in `budgetlm.config`; `add_settings` turns its fields into
flags (help text and default from the field), plus `--set KEY=VALUE` and `--print-config`.
Flag values stay strings and are applied by `config.set_key`, the path `--set`, recipes and the
Python API share, so every spelling is checked the same way.

The rules, the same for every verb:
- `-` and `_` are interchangeable in flag names (`--max-new-tokens` = `--max_new_tokens`,
  `--model.vocab-size` = `--model.vocab_size`): `normalize_argv` rewrites them before parsing;
- the names other tools use for a setting (a field's `aliases`: `--learning-rate`,
  `--train.max_grad_norm`, `--model.block_size`) are accepted, and stored under our name;
- a flag that does not exist is refused under the verb's own usage line, naming the flag it
  most likely meant in full (`--train.lr` for `--lr`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import typing
from typing import Any

from budgetlm.config import apply_overrides, config_overrides, iter_fields, to_dict

DEST = "cfg::"  # parsed flag values are kept under cfg::KEY, apart from the verb's own arguments (see config.config_overrides)


class HelpFormatter(argparse.HelpFormatter):
    """Shows the default of every option that has one (config flags write their own)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default:" in text or not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            return text
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            return text
        return f"{text} (default: %(default)s)"


def flag_name(key: str) -> str:
    """The flag of a config key as `--help` shows it: `train.grad_clip` -> `--train.grad-clip`."""
    return "--" + key.replace("_", "-")


def normalize_argv(argv: list[str]) -> list[str]:
    """`--max_new_tokens=5` -> `--max-new-tokens=5`: either spelling of every flag is accepted.

    Only the name of a long option changes (never a value, nor anything after a bare `--`)."""
    out, rest = [], False
    for arg in argv:
        if rest or not arg.startswith("--") or arg == "--":
            rest = rest or arg == "--"
            out.append(arg)
            continue
        name, eq, value = arg.partition("=")
        out.append(name.replace("_", "-") + eq + value)
    return out


def _section_title(cls: type, prefix: str) -> str:
    doc = (cls.__doc__ or "").strip()
    auto = doc.startswith(cls.__name__ + "(")  # dataclass's generated signature: no docstring of its own
    name = prefix.rstrip(".") or cls.__name__
    return f"{name} settings" + ("" if auto or not doc else f": {doc.splitlines()[0]}")


def add_config_flags(parser: argparse.ArgumentParser, cls: type, dotted: bool, skip: tuple[str, ...] = ()) -> None:
    """One flag per config field (`--train.lr` or, flat, `--vocab-size`), help and default from the field.

    With `dotted`, top-level fields are skipped (the verb gives them flags of its own) and each
    section gets its own group, titled by the section's docstring."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, f, tp in iter_fields(cls):
        if (dotted and "." not in key) or key in skip:
            continue
        section = key.rsplit(".", 1)[0] if "." in key else ""
        if section not in groups:
            groups[section] = parser.add_argument_group(_section_title(_resolve(cls, section), section + "." if section else ""))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        aliases = f.metadata.get("aliases", ())
        extra = f" {{{','.join(choices)}}}" if choices else ""
        extra += f" (also: {', '.join(aliases)})" if aliases else ""
        shown = "unset" if default is None else ("''" if default == "" else default)
        kwargs: dict[str, Any] = dict(dest=DEST + key, default=argparse.SUPPRESS)
        if f.metadata.get("switch"):
            kwargs.update(action="store_const", const="true")
        else:
            kwargs.update(metavar=_type_name(tp))
        groups[section].add_argument(flag_name(key), help=f"{f.metadata.get('help', '')}{extra} (default: {shown})", **kwargs)
        for alias in aliases:  # accepted, not listed again: the help line above names them
            groups[section].add_argument(flag_name(section + "." + alias if section else alias), help=argparse.SUPPRESS, **kwargs)


def _resolve(cls: type, section: str) -> type:
    """The dataclass of a (dotted) section of `cls`."""
    for part in filter(None, section.split(".")):
        cls = typing.get_type_hints(cls)[part]
    return cls


def _type_name(tp) -> str:
    name = getattr(tp, "__name__", None)
    if name is None:  # float | None and the like
        args = [a for a in getattr(tp, "__args__", ()) if a is not type(None)]
        name = getattr(args[0], "__name__", str(tp)) if args else str(tp)
    return name.upper()


def add_settings(parser: argparse.ArgumentParser, cls: type, dotted: bool = False, skip: tuple[str, ...] = (), set_example: str = "") -> None:
    """The settings of a verb: a flag per field, `--set KEY=VALUE` and `--print-config`."""
    example = set_example or next(k for k, _, _ in iter_fields(cls) if k not in skip)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help=f"set any setting by its key, e.g. {example}=... (later wins)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved settings (YAML, or JSON with --json) and exit")
    add_config_flags(parser, cls, dotted, skip)


def flag_overrides(args) -> list[str]:
    """The `key=value` overrides of the settings flags alone (for a verb whose `--set` means other keys)."""
    return [f"{k[len(DEST) :]}={v}" for k, v in vars(args).items() if k.startswith(DEST)]


def settings_from_args(cls: type, args, base: Any = None) -> Any:
    """The verb's config: `base` (default: the dataclass defaults) with the command line's flags and `--set` applied."""
    cfg = base if base is not None else cls()
    return apply_overrides(cfg, config_overrides(args))


def print_config(cfg: Any, as_json: bool = False, out=None) -> None:
    import yaml

    out = out or sys.stdout
    data = to_dict(cfg)
    out.write(json.dumps(data) + "\n" if as_json else yaml.safe_dump(data, sort_keys=False))


def unknown_flags_message(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """`unrecognized arguments: --lr 3e-4 (did you mean --train.lr?)`, the hint naming the full flag."""
    hints = []
    known = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    for arg in extras:
        if not arg.startswith("--"):
            continue
        name = arg.split("=", 1)[0]
        leaf = name[2:].rsplit(".", 1)[-1]
        same_leaf = [k for k in known if k[2:].rsplit(".", 1)[-1] == leaf and k != name]
        close = same_leaf[:1] or difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        if close:
            hints.append(f"{name}: did you mean {close[0]}?")
    hint = f" ({'; '.join(hints)})" if hints else ""
    return f"unrecognized arguments: {' '.join(extras)}{hint}"
