"""key=value log fields (logfmt) that scripts can read back exactly.

A value is written bare unless it is empty or holds white space, a quote,
an equals sign, a backslash or a character that does not print; then it is
a double-quoted JSON string (``vm="my vm"``, ``vm="say \\"hi\\""``). So a
completion line stays one line and ``parse`` returns every value as it was
given, whatever a VM is called.
"""

from __future__ import annotations

import json
import re

# key=value or key="quoted \" value"; a key starts a field only after white space.
_FIELD = re.compile(r'(?:^|(?<=\s))(\w+)=("(?:[^"\\]|\\.)*"|[^\s"]*)')


def value(v: object) -> str:
    text = str(v)
    if text and all(c.isprintable() and not c.isspace() and c not in '"=\\' for c in text):
        return text
    quoted = json.dumps(text, ensure_ascii=False)
    # JSON's \uXXXX (a surrogate pair above U+FFFF) for what does not print.
    return "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in quoted)


def fields(**kv: object) -> str:
    """key=value pairs in the order given, values quoted as needed."""
    return " ".join(f"{k}={value(v)}" for k, v in kv.items())


def parse(text: str) -> dict[str, str]:
    """The key=value fields of text (later keys win)."""
    out = {}
    for key, raw in _FIELD.findall(text):
        out[key] = json.loads(raw) if raw.startswith('"') else raw
    return out
