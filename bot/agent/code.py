"""Finding the code to run in a reply."""

from __future__ import annotations

import io
import re
import tokenize

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_PY_FENCE = re.compile(r"```[ \t]*(python|py|python3)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def last_python_block(reply: str) -> str | None:
    """The last fenced python block of a reply (the one the reference demo runs), or None.

    Blocks tagged python win; an untagged block counts only when no tagged one exists, since
    models also fence shell output and data in plain ```.
    """
    tagged = _PY_FENCE.findall(reply)
    if tagged:
        code = tagged[-1][1]
    else:
        untagged = [m for m in _FENCE.findall(reply)]
        if not untagged:
            return None
        code = untagged[-1]
    code = code.strip("\n")
    return code if code.strip() else None


def calls_input(code: str) -> bool:
    """True when the code calls the builtin ``input()`` (a name token followed by ``(``).

    Tokenizing ignores mentions in strings and comments; unparsable code falls back to a regex.
    """
    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(code).readline)
                  if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT)]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return re.search(r"(?<![\w.])input\s*\(", code) is not None
    for prev, tok, nxt in zip([None, *tokens[:-1]], tokens, [*tokens[1:], None], strict=True):
        if tok.type == tokenize.NAME and tok.string == "input" and nxt is not None and nxt.string == "(":
            if prev is None or prev.string not in (".", "def"):
                return True
    return False
