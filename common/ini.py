"""INI configuration with typed sections: the one loader of every daemon.

A section is a dataclass; each field is declared with ``option(default,
doc, check=...)``: its type annotation (int, float, bool, str) says how the
text converts, ``check`` validates the value where the option is declared
(``at_least``, ``positive``, ``choice``, ``uuid``, ...). The effective
configuration is the defaults, then the main file, then ``FILE.d/*.conf``
in name order; later files win per option. Inline ``#`` and ``;``
comments are accepted (after white space).

Every error is a ``ConfigError`` naming the file, section, key and value;
the daemons exit with ``EXIT_CONFIG`` (2) on it, and their systemd units
do not restart on that status.
"""

from __future__ import annotations

import configparser
import dataclasses
import glob
import io
import os
import re
import uuid as uuidlib
from collections.abc import Callable, Iterator
from typing import Any

# Exit status of a daemon whose configuration cannot be used.
EXIT_CONFIG = 2

Check = Callable[[Any], None]


class ConfigError(ValueError):
    """The configuration cannot be used as written; says where and why."""

    def __init__(
        self, reason: str, *, file: str = "", section: str = "", key: str = "", value: str | None = None
    ) -> None:
        self.reason = reason
        self.file = file
        self.section = section
        self.key = key
        self.value = value
        where = f"{file}: " if file else ""
        if section:
            where += f"[{section}] "
        if key:
            where += f"{key} = {value!r}: " if value is not None else f"{key}: "
        super().__init__(f"{where}{reason}")


def option(default: Any, doc: str, check: Check | None = None, required: bool = False) -> Any:
    """A typed option: default, one-line doc, a check run on every value set.

    ``required``: the default (0 or "") is a placeholder the files must replace.
    """
    return dataclasses.field(default=default, metadata={"doc": doc, "check": check, "required": required})


# Checks: raise ValueError with the reason.


def at_least(low: float) -> Check:
    def check(value: Any) -> None:
        if value < low:
            raise ValueError(f"must be >= {low}")

    return check


def in_range(low: float, high: float) -> Check:
    def check(value: Any) -> None:
        if not low <= value <= high:
            raise ValueError(f"must be in {low}..{high}")

    return check


def positive(value: Any) -> None:
    if not value > 0:
        raise ValueError("must be > 0")


def non_negative(value: Any) -> None:
    if value < 0:
        raise ValueError("must be >= 0")


def choice(*values: str) -> Check:
    def check(value: Any) -> None:
        if value not in values:
            raise ValueError("must be one of " + ", ".join(repr(v) for v in values))

    return check


def uuid(value: Any) -> None:
    if value == "":
        return
    try:
        uuidlib.UUID(value)
    except ValueError:
        raise ValueError("not a UUID") from None


def uuids_or_star(value: Any) -> None:
    """UUIDs separated by white space, or "*"."""
    for word in value.split():
        if word != "*":
            try:
                uuidlib.UUID(word)
            except ValueError:
                raise ValueError(f"{word!r} is not a UUID (or *)") from None


def listen(value: Any) -> None:
    from xtnd.common import promhttp

    try:
        promhttp.parse_listen(value)
    except promhttp.ListenError as e:
        raise ValueError(str(e)) from None


_BOOLEANS = configparser.ConfigParser.BOOLEAN_STATES


def convert(kind: Any, text: str) -> Any:
    """Text -> the field's type; ValueError says what was expected."""
    name = kind if isinstance(kind, str) else kind.__name__
    if name == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError("not an integer") from None
    if name == "float":
        try:
            return float(text)
        except ValueError:
            raise ValueError("not a number") from None
    if name == "bool":
        try:
            return _BOOLEANS[text.lower()]
        except KeyError:
            raise ValueError("not a boolean (yes/no)") from None
    return text


def files(path: str) -> list[str]:
    """The file and its drop-ins, in the order they are read."""
    return [path, *sorted(glob.glob(os.path.join(path + ".d", "*.conf")))]


def read(path: str) -> Iterator[tuple[str, configparser.ConfigParser]]:
    """Parse the file (which must exist) then its drop-ins: (file, parser)."""
    if not os.path.exists(path):
        raise ConfigError("no such config file", file=path)
    for name in files(path):
        parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
        try:
            with open(name) as f:
                parser.read_file(f, name)
        except OSError as e:
            raise ConfigError(f"cannot read: {e.strerror or e}", file=name) from None
        except configparser.Error as e:
            raise ConfigError(f"not an INI file: {_parse_error(e)}", file=name) from None
        yield name, parser


def _parse_error(e: configparser.Error) -> str:
    """configparser's message without the file name it repeats."""
    if isinstance(e, configparser.MissingSectionHeaderError):
        return f"line {e.lineno}: {e.line.strip()!r} comes before any [section]"
    if isinstance(e, configparser.DuplicateOptionError | configparser.DuplicateSectionError):
        where = f"[{e.section}] {e.option}" if isinstance(e, configparser.DuplicateOptionError) else f"[{e.section}]"
        return f"line {e.lineno}: {where} set twice in one file"
    return re.sub(r"^(While reading from|Source contains parsing errors:) '[^']*'\s*", "", " ".join(str(e).split()))


def apply(target: Any, items: dict[str, str], *, file: str, section: str, skip: tuple[str, ...] = ()) -> None:
    """Set target's options from one parsed section, converted and checked."""
    fields = {f.name: f for f in dataclasses.fields(target) if f.name not in skip}
    for key, text in items.items():
        field = fields.get(key)
        if field is None:
            raise ConfigError("unknown option", file=file, section=section, key=key, value=text)
        try:
            value = convert(field.type, text)
            check = field.metadata.get("check")
            placeholder = field.metadata.get("required") and value == field.default
            if check is not None and not placeholder:
                check(value)
        except ValueError as e:
            raise ConfigError(str(e), file=file, section=section, key=key, value=text) from None
        setattr(target, key, value)


def check_section(target: Any, *, file: str, section: str) -> None:
    """Required options are set, and every value passes its check (also
    values set in code, not read from a file)."""
    for field in dataclasses.fields(target):
        value = getattr(target, field.name)
        if field.metadata.get("required") and not value:
            raise ConfigError("is required", file=file, section=section, key=field.name)
        check = field.metadata.get("check")
        if check is not None:
            try:
                check(value)
            except ValueError as e:
                raise ConfigError(str(e), file=file, section=section, key=field.name, value=str(value)) from None


def show_section(out: io.StringIO, name: str, target: Any) -> None:
    """One section as INI, each option with its doc as a comment."""
    out.write(f"[{name}]\n")
    for field in dataclasses.fields(target):
        doc = field.metadata.get("doc")
        if doc:
            out.write(f"# {doc}\n")
        value = getattr(target, field.name)
        if isinstance(value, bool):
            value = "yes" if value else "no"
        out.write(f"{field.name} = {value}\n")
