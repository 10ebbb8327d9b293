"""Man page and bash completion of ``xtnd``, generated from its own argparse parser.

    python packaging/manpage.py man VERSION > xtnd.1
    python packaging/manpage.py completion > xtnd.bash

Build-time only (packaging/build_deb.py runs it); walks every subcommand.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Iterator

from xtnd.tools import cli


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines())


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:  # type: ignore[type-arg]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str]]:
    """(command words, parser, one-line help) of every command, depth first."""
    sub = _subparsers(parser)
    if sub is None:
        return
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    for name, child in sub.choices.items():
        words = (*path, name)
        yield words, child, helps.get(name, "")
        yield from walk(child, words)


def _options(parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
            continue
        if action.option_strings:
            names = ", ".join(f"\\fB{_roff(o)}\\fR" for o in action.option_strings)
            if action.nargs != 0:
                names += f" \\fI{_roff(action.metavar or action.dest.upper())}\\fR"
        else:
            names = f"\\fI{_roff(str(action.metavar or action.dest))}\\fR"
        text = (action.help or "").replace("%(default)s", str(action.default))
        out += [".TP", names, _roff(text)]
    return out


def man(version: str) -> str:
    parser = cli.build_parser()
    date = datetime.date.today().isoformat()
    lines = [
        f'.TH XTND 1 "{date}" "xtnd {version}" "User Commands"',
        ".SH NAME",
        "xtnd \\- " + _roff(parser.description or ""),
        ".SH SYNOPSIS",
        "\\fBxtnd\\fR [\\fB\\-v\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]",
        ".SH DESCRIPTION",
        "One command for the SPM and HSM daemons, storage domains and volumes, status, statistics and "
        "benchmarks. Each command's own options follow; \\fBxtnd\\fR \\fICOMMAND\\fR \\fB\\-\\-help\\fR "
        "prints them too.",
        ".SH OPTIONS",
        *_options(parser),
        ".SH COMMANDS",
    ]
    for words, child, help_text in walk(parser):
        lines += [".SS " + _roff("xtnd " + " ".join(words)), _roff(child.description or help_text)]
        usage = child.format_usage().removeprefix("usage: ").strip()
        lines += [".PP", ".nf", _roff(" ".join(usage.split())), ".fi"]
        lines += _options(child)
    lines += [
        ".SH FILES",
        ".TP",
        "/etc/xtnd/spm.conf, /etc/xtnd/spm.conf.d/*.conf",
        "SPM daemon configuration.",
        ".TP",
        "/etc/xtnd/hsm.conf, /etc/xtnd/hsm.conf.d/*.conf",
        "HSM daemon configuration.",
        ".TP",
        "/etc/xtnd/storage.json",
        "Where this host finds its storage domains.",
        ".TP",
        "/run/xtnd/spm.sock, /run/xtnd/hsm.sock",
        "Control sockets (root only) used by \\fBxtnd status\\fR and \\fBlog\\-level\\fR.",
        ".TP",
        "/run/xtnd/lockspace/",
        "Lock files by which the HSM and the SPM of this host share its host id in a lockspace.",
        ".SH EXIT STATUS",
        "0 on success; 2 for bad usage or an unusable configuration. \\fBxtnd status\\fR: 0 healthy, "
        "1 degraded, 3 down. The SPM daemon: 3 lease lost, 4 extends abandoned at shutdown. "
        "The HSM daemon: 3 host id lost (its mailbox block is no longer written).",
        ".SH SEE ALSO",
        "\\fBsanlock\\fR(8), \\fBlvm\\fR(8), \\fBvirsh\\fR(1), \\fBsystemctl\\fR(1); /usr/share/doc/xtnd/README.md",
    ]
    return "\n".join(lines) + "\n"


def completion() -> str:
    """A bash completion script: subcommands and options of every command."""
    parser = cli.build_parser()
    table = {"": (sorted(_subparsers(parser).choices) if _subparsers(parser) else [], _flags(parser))}  # type: ignore[union-attr]
    for words, child, _help in walk(parser):
        sub = _subparsers(child)
        table[" ".join(words)] = (sorted(sub.choices) if sub else [], _flags(child))
    cases = "\n".join(
        f'        "{key}") subs="{" ".join(subs)}" flags="{" ".join(flags)}" ;;'
        for key, (subs, flags) in sorted(table.items())
    )
    known = "\n".join(f'            "{k}") path="$path${{path:+ }}$w" ;;' for k in sorted(table) if k)
    return f"""# bash completion for xtnd (generated from its argparse parser)
_xtnd() {{
    local cur path="" i w subs="" flags=""
    cur=${{COMP_WORDS[COMP_CWORD]}}
    for ((i = 1; i < COMP_CWORD; i++)); do
        w=${{COMP_WORDS[i]}}
        [[ $w == -* ]] && continue
        case "$path${{path:+ }}$w" in
{known}
        esac
    done
    case "$path" in
{cases}
    esac
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$flags" -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$subs" -- "$cur"))
    fi
}}
complete -o default -F _xtnd xtnd
"""


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(o for a in parser._actions for o in a.option_strings if o.startswith("--") or len(o) == 2)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "man"
    sys.stdout.write(man(sys.argv[2] if len(sys.argv) > 2 else "0") if what == "man" else completion())
