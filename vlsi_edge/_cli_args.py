"""Flags from function signatures: each CLI verb is a plain function; this turns its parameters into argparse
arguments (keyword parameters → `--flag-name`, positional-only → positionals, `bool` → `--x/--no-x`,
`Literal[...]` → choices, `list[str]` → several values). Help for a flag comes from the docstring's `Args:` lines.
"""
from __future__ import annotations

import argparse
import inspect
import re
import typing
from pathlib import Path


def _doc_args(doc: str) -> dict[str, str]:
    out: dict[str, str] = {}
    in_args = False
    for line in (doc or "").splitlines():
        s = line.strip()
        if s in ("Args:", "Arguments:"):
            in_args = True
            continue
        if in_args:
            m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(.+)$", s)
            if m:
                out[m.group(1)] = m.group(2)
            elif not s:
                in_args = False
    return out


def _summary(doc: str) -> str:
    return (doc or "").strip().split("\n\n")[0].replace("\n", " ")


def add_function(sub: argparse._SubParsersAction, name: str, fn) -> argparse.ArgumentParser:
    doc = inspect.getdoc(fn) or ""
    helps = _doc_args(doc)
    summary = _summary(doc).replace("%", "%%")
    names = getattr(fn, "__cli_flags__", {})
    p = sub.add_parser(name, help=summary, description=summary,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(fn)
    for pname, param in inspect.signature(fn).parameters.items():
        ann = hints.get(pname, str)
        origin, args = typing.get_origin(ann), typing.get_args(ann)
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            non_none = [a for a in args if a is not type(None)]
            ann = non_none[0] if len(non_none) == 1 else str
            origin, args = typing.get_origin(ann), typing.get_args(ann)
        kw: dict = {"help": helps.get(pname, " ").replace("%", "%%")}
        if ann is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Literal:
            kw["choices"] = list(args)
            kw["type"] = type(args[0])
        elif origin in (list, tuple):
            kw["nargs"] = "+"
            kw["type"] = args[0] if args else str
            if param.kind is not inspect.Parameter.POSITIONAL_ONLY:
                kw["action"] = "extend"  # repeated flags add up: --set a=1 --set b=2
        else:
            kw["type"] = {Path: str}.get(ann, ann if ann in (int, float, str) else str)
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:
            if param.default is not inspect.Parameter.empty:
                kw["nargs"] = kw.get("nargs", "?")
                kw["default"] = param.default
            p.add_argument(pname, **kw)
            continue
        flag = names.get(pname, "--" + pname.replace("_", "-"))
        if ann is not bool and "choices" not in kw:
            kw.setdefault("metavar", flag.lstrip("-").replace("-", "_").upper())
        if param.default is inspect.Parameter.empty:
            kw["required"] = True
        else:
            kw["default"] = param.default
        p.add_argument(flag, dest=pname, **kw)
    p.set_defaults(_fn=fn)
    return p


def flag_names(**names: str):
    """Give parameters flag names other than their own, e.g. `@flag_names(json_out="--json")`."""
    def deco(fn):
        fn.__cli_flags__ = names
        return fn
    return deco


def call(ns: argparse.Namespace):
    fn = ns._fn
    params = inspect.signature(fn).parameters
    pos = [getattr(ns, n) for n, p in params.items() if p.kind is inspect.Parameter.POSITIONAL_ONLY]
    kw = {n: getattr(ns, n) for n, p in params.items() if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    return fn(*pos, **kw)
