"""Checks of command-line options, shared by train.py, the bench and hub commands and `dida_timm.inference`.

A command lists its rules as a table of (option dest, check) next to its parser and calls `check_options`
right after parsing; a value that makes no sense ends the command with argparse's usage error (exit 2) and one
line `error: --option: why`. Values from a YAML config go through `config_defaults` first, which converts and
checks them as the command line would (types, choices, list shapes).
"""
import argparse
import math
import re
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import yaml

__all__ = [
    'Check', 'at_least', 'between', 'greater_than', 'distinct', 'increasing', 'hub_repo_id', 'usable_device',
    'check_options', 'config_defaults', 'option_name', 'yaml_value']

# a check returns why the value is wrong, or None when it is fine; None values (option not given) pass
Check = Callable[[Any], Optional[str]]


def _values(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _number_problem(x) -> Optional[str]:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return f'must be a number, got {x!r}'
    if not math.isfinite(x):
        return f'must be finite, got {x}'
    return None


def _each_number(ok: Callable[[float], bool], rule: str) -> Check:
    """A check that every value (one, or each of a list) is a finite number for which ok(x) holds."""
    def check(value):
        for x in _values(value) if value is not None else []:
            why = _number_problem(x)
            if why or not ok(x):
                return why or f'{rule}, got {x}'
        return None
    return check


def at_least(minimum: float) -> Check:
    """Every value is a finite number >= minimum."""
    return _each_number(lambda x: x >= minimum, f'must be >= {minimum}')


def greater_than(bound: float) -> Check:
    """Every value is a finite number > bound."""
    return _each_number(lambda x: x > bound, f'must be > {bound}')


def between(low: float, high: float, high_open: bool = False, low_open: bool = False) -> Check:
    """Every value is a finite number in [low, high] (either end open with high_open / low_open)."""
    return _each_number(lambda x: (low < x if low_open else low <= x) and (x < high if high_open else x <= high),
                        f'must be in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}')


def distinct(value) -> Optional[str]:
    """No element of a list is given twice (a domain or seed named twice would silently count double)."""
    seen, twice = set(), []
    for x in _values(value) if value is not None else []:
        key = str(Path(x).resolve()) if isinstance(x, Path) else x
        if key in seen and x not in twice:
            twice.append(x)
        seen.add(key)
    return f'{", ".join(map(str, twice))} given twice' if twice else None


def increasing(value) -> Optional[str]:
    """A list whose every element is larger than the one before (milestones: timm bisects them)."""
    values = list(_values(value)) if value is not None else []
    if any(b <= a for a, b in zip(values, values[1:])):
        return f'must increase, got {values}'
    return None


def hub_repo_id(value) -> Optional[str]:
    """A Hugging Face repo id, ORG/NAME."""
    if value is not None and not re.fullmatch(r'[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}', value):
        return f'must be ORG/NAME (letters, digits, - _ .), got {value!r}'
    return None


def usable_device(value) -> Optional[str]:
    """A torch device this machine has: `cpu`, or its accelerator (`cuda`, `cuda:1`, ...) with the index in range."""
    if value is None:
        return None
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as e:
        return f'not a torch device: {value!r} ({e})'
    if device.type == 'cpu':
        return None
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is None or accelerator.type != device.type:
        return f'no {device.type} device on this machine ({accelerator.type if accelerator else "cpu only"})'
    count = torch.accelerator.device_count()
    if device.index is not None and device.index >= count:
        return f'{value}: this machine has {count} {device.type} device{"s" if count > 1 else ""}'
    return None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader refusing a mapping that gives a key twice (safe_load keeps the last one without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        keys = []  # a list, not a set: an unhashable key gets SafeLoader's own error below
        for key_node, _ in node.value:
            if key_node.tag == 'tag:yaml.org,2002:merge':  # `<<: *base`: the mapping's own keys override its keys
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in keys:
                raise yaml.constructor.ConstructorError('while constructing a mapping', node.start_mark,
                                                        f'key {key!r} given twice', key_node.start_mark)
            keys.append(key)
        return super().construct_mapping(node, deep)


def yaml_value(text: str) -> Any:
    """An option's value read as YAML (an argparse `type`): text that is not YAML is a usage error that quotes it,
    not a yaml traceback (argparse turns only ValueError, TypeError and ArgumentTypeError into usage errors)."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        why = getattr(e, 'problem', None) or ' '.join(str(e).split())  # a reader error's text spans two lines
        raise argparse.ArgumentTypeError(f'not valid YAML: {text!r} ({why})') from e


def option_name(parser: argparse.ArgumentParser, dest: str) -> str:
    """The option a dest belongs to, as users type it (`--batch-size`; a positional's own name)."""
    for action in parser._actions:
        if action.dest == dest:
            long = [o for o in action.option_strings if o.startswith('--')]
            return (long or action.option_strings or [action.dest])[0]
    return '--' + dest.replace('_', '-')


def check_options(parser: argparse.ArgumentParser, args: argparse.Namespace,
                  rules: Sequence[Tuple[str, Check]]) -> None:
    """Apply (dest, check) rules in order; the first failure ends the command: `error: --option: why`."""
    for dest, check in rules:
        why = check(getattr(args, dest))
        if why:
            parser.error(f'{option_name(parser, dest)}: {why}')


def _convert(parser: argparse.ArgumentParser, action: argparse.Action, value, where: str):
    """One config value converted and checked as if it had been typed after the action's option."""
    name = option_name(parser, action.dest)

    def fail(why: str):
        parser.error(f'{name}: {why} (in {where})')

    if action.nargs == 0:  # flags: store_true / BooleanOptionalAction
        if not isinstance(value, bool):
            fail(f'must be true or false, got {value!r}')
        return value
    if value is None:
        # the command line cannot give None to an option whose default is a value: later code counts on one
        if action.default is not None:
            fail(f'`{action.dest}: null` is not a value; leave the key out for the default, {action.default!r}')
        return None
    is_list = action.nargs in ('+', '*') or isinstance(action.nargs, int)
    if is_list:
        items = value if isinstance(value, list) else [value]
        if isinstance(action.nargs, int) and len(items) != action.nargs:
            fail(f'needs {action.nargs} values, got {value!r}')
        if action.nargs == '+' and not items:
            fail('needs at least one value')
    elif isinstance(value, (list, dict)) and action.type is not yaml_value:
        fail(f'takes one value, got {value!r}')
    else:
        items = [value]
    out = []
    for item in items:
        if action.type in (int, float):
            if isinstance(item, str):
                try:
                    item = action.type(item)
                except ValueError:
                    fail(f'must be {"an integer" if action.type is int else "a number"}, got {item!r}')
            if isinstance(item, bool) or not isinstance(item, (int, float)) or (
                    action.type is int and isinstance(item, float) and not item.is_integer()):
                fail(f'must be {"an integer" if action.type is int else "a number"}, got {item!r}')
            item = action.type(item)
        elif action.type is Path:
            item = Path(str(item))
        elif action.type is None and not isinstance(item, str):
            item = str(item)  # YAML reads `target: 0` as a number; the command line would give '0'
        if action.choices is not None and item not in action.choices:
            fail(f'{item!r} is not one of {list(action.choices)}')
        out.append(item)
    return out if is_list else out[0]


def config_defaults(parser: argparse.ArgumentParser, path: Path) -> Dict[str, Any]:
    """The YAML config at `path` as parser defaults, every value checked like the command line's."""
    path = Path(path)
    if not path.is_file():
        parser.error(f'--config: file not found: {path}')
    try:
        cfg = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        parser.error(f'--config: {path} is not valid YAML: {e}')
    if cfg is None:  # a run's args.yaml cut short by a crash read as no options: a run of the defaults elsewhere
        parser.error(f'--config: {path} holds no option (an empty file?)')
    if not isinstance(cfg, dict):
        parser.error(f'--config: {path} must hold a mapping of option: value')
    actions = {a.dest: a for a in parser._actions}
    # a config named there would only set --config's default, which the -c given replaces: silently ignored. A run's
    # args.yaml names the config the run read, but records every option besides: resuming from it nests nothing
    record = set(actions) - {'help'} <= set(cfg)
    if cfg.get('config') and not record:
        parser.error(f'--config: {path} names another config ({cfg["config"]!r}); configs do not nest')
    unknown = sorted(set(cfg) - set(actions))
    if unknown:
        parser.error(f'{path}: unknown keys {unknown}')
    return {key: _convert(parser, actions[key], value, str(path)) for key, value in cfg.items()}
