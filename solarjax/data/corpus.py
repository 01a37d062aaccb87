"""The built-in corpus: the Python standard library's own top-level modules, which every Python
installation has, so that the demo, the tests and the built-in task need no download. Here: the
files, their two domains (code, and the prose of docstrings and comments) that a config names as
`builtin:code` and `builtin:prose`, and the instruction data (SFT conversations and preference
pairs) derived from them.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import random
import sys
import sysconfig
import tokenize
from pathlib import Path

from solarjax.errors import ConfigError
from solarjax.files import publish_once

BUILTIN = "builtin"  # a data path naming the whole built-in corpus; "builtin:DOMAIN" one domain of it
DOMAINS = ("code", "prose")


def default_corpus_files() -> list[Path]:
    """The built-in corpus: the standard library's top-level Python modules: real English prose in
    code, comments and docstrings, about 5 MB, that every Python installation has; sorted."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


# ---------------------------------------------------------------------------------------------
# The two domains: code, and the prose of its docstrings and comments


def split_module(text: str) -> tuple[str, str]:
    """(code, prose) of one module's source. prose: its docstrings (module, class, function), cleaned
    of indentation, and its comments (consecutive comment lines as one paragraph), in file order,
    paragraphs apart; comments with no letter (rulers) are dropped. code: the source without them,
    still valid Python (a body that was only a docstring becomes `pass`), runs of blank lines made
    one. A docstring that shares a line with code stays in the code."""
    lines = text.splitlines()
    code = list(lines)
    items: list[tuple[int, str | list[str]]] = []  # (line, paragraph) of prose
    dropped: set[int] = set()  # 0-based lines that were all docstring or comment
    inside: set[int] = set()  # lines inside a string (after its first): kept as they are, blank or not
    block: list[str] = []
    last = -2
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.STRING or tok.type == getattr(tokenize, "FSTRING_MIDDLE", None):
            inside.update(range(tok.start[0], tok.end[0]))
        if tok.type != tokenize.COMMENT:
            continue
        row, col = tok.start[0] - 1, tok.start[1]
        words = tok.string.lstrip("#").strip()
        if tok.string.startswith("#!") or row < 2 and "coding" in words:  # a shebang, an encoding line
            continue
        whole_line = not lines[row][:col].strip()
        code[row] = lines[row][:col].rstrip()
        if whole_line:
            dropped.add(row)
        if not any(c.isalpha() for c in words):
            continue
        if whole_line and row == last + 1 and block:
            block.append(words)
        else:
            block = [words]
            items.append((row + 1, block))  # the list grows while the comment block goes on
        last = row if whole_line else -2
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        expr = node.body[0] if node.body else None
        if doc is None or not isinstance(expr, ast.Expr):
            continue
        if lines[expr.lineno - 1][:expr.col_offset].strip() or code[expr.end_lineno - 1][expr.end_col_offset:].strip():
            continue
        items.append((expr.lineno, doc.strip()))
        dropped.update(range(expr.lineno - 1, expr.end_lineno))
        if len(node.body) == 1 and not isinstance(node, ast.Module):
            code[expr.lineno - 1] = " " * expr.col_offset + "pass"
            dropped.discard(expr.lineno - 1)
    prose = "\n\n".join(p if isinstance(p, str) else " ".join(p) for _, p in sorted(items, key=lambda i: i[0]))
    kept, blank = [], False
    for i, line in enumerate(code):
        if i in dropped:
            continue
        if not line.strip() and i not in inside:
            if not blank and kept:
                kept.append("")
            blank = True
            continue
        kept.append(line)
        blank = False
    return "\n".join(kept).strip("\n") + "\n", prose + "\n" if prose else ""


def builtin_domain(path: str, where: str) -> str | None:
    """"" for the data path `builtin`, DOMAIN for `builtin:DOMAIN`, None for any other path; an
    unknown domain is refused, naming `where` it was given."""
    if path != BUILTIN and not path.startswith(BUILTIN + ":"):
        return None
    domain = path[len(BUILTIN) + 1:]
    if domain and domain not in DOMAINS:
        raise ConfigError(f"{where}: unknown built-in corpus {path!r}; expected {BUILTIN} (all of it) or one of its "
                          f"domains: {', '.join(f'{BUILTIN}:{d}' for d in DOMAINS)}")
    return domain


def builtin_paths(path: str, folder: str | Path) -> list[Path]:
    """The files a data path `builtin` (the corpus) or `builtin:DOMAIN` names. A domain's documents
    (one per module that has any) are written once into `folder`, under a name that depends on this
    Python's standard library, so another Python never reads a stale split."""
    domain = builtin_domain(path, path)
    if domain is None:
        raise ValueError(f"{path} is not a built-in corpus path")  # a caller's bug: it checks builtin_domain first
    files = default_corpus_files()
    if not domain:
        return files
    key = hashlib.sha256(json.dumps([sys.version, str(files[0].parent), len(files), 2]).encode()).hexdigest()[:12]

    def write(tmp: Path) -> None:
        for d in DOMAINS:
            (tmp / d).mkdir(parents=True)
        for f in files:
            for d, text in zip(DOMAINS, split_module(f.read_text(encoding="utf-8"))):
                if text.strip():
                    (tmp / d / f"{f.stem}.txt").write_text(text, encoding="utf-8")

    root = publish_once(Path(folder).expanduser() / f"builtin-text-{key}", write)
    return sorted((root / domain).glob("*.txt"))


# ---------------------------------------------------------------------------------------------
# Built-in instruction data, derived from the built-in corpus (the standard library's modules)

SYSTEM = "You write Python functions for the standard library."


def _functions(path: Path, max_lines: int) -> list[tuple[str, str, str]]:
    """(what to write, docstring's first paragraph, source without the docstring, dedented) of the
    module's functions and methods with a docstring and at most max_lines lines of body."""
    text = path.read_text(encoding="utf-8", errors="strict")
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    lines, out = text.splitlines(), []
    nodes = [(None, n) for n in tree.body] + [(c.name, n) for c in tree.body if isinstance(c, ast.ClassDef)
                                              for n in c.body]
    for owner, node in nodes:
        if not isinstance(node, ast.FunctionDef) or node.decorator_list or ast.get_docstring(node) is None:
            continue
        doc = ast.get_docstring(node).split("\n\n")[0].strip()
        body = node.body[1:]
        if not body or not 20 <= len(doc) <= 300 or ">>>" in doc or node.lineno == body[0].lineno:
            continue
        code = [lines[node.lineno - 1]] + lines[body[0].lineno - 1:node.end_lineno]
        if len(code) - 1 > max_lines or any(not line.isascii() for line in code):
            continue
        indent = node.col_offset
        code = [line[indent:] for line in code]
        what = f"`{code[0].strip()}`" + (f" of class `{owner}`" if owner else "")
        out.append((what, doc, "\n".join(code)))
    return out


def _corrupt(code: str) -> str:
    """The function with its body's lines in reverse order: the same tokens, wrong code."""
    head, *body = code.splitlines()
    return "\n".join([head] + body[::-1])


def builtin_records(layout: str, max_lines: int = 10) -> list[dict]:
    """SFT: docstring -> function, as conversations with a system message (every fifth has a
    second turn asking for the next function of the same module). Pairs: the real function
    (chosen) vs. its body in reverse line order (rejected), for functions of two lines or more."""
    records = []
    for path in default_corpus_files():
        functions = _functions(path, max_lines)
        for k, (what, doc, code) in enumerate(functions):
            ask = f"Write {what} from the `{path.stem}` module: {doc}"
            if layout == "sft":
                messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ask},
                            {"role": "assistant", "content": code}]
                if k % 5 == 4 and k + 1 < len(functions):
                    what2, doc2, code2 = functions[k + 1]
                    messages += [{"role": "user", "content": f"Now {what2}: {doc2}"},
                                 {"role": "assistant", "content": code2}]
                records.append({"messages": messages})
            elif code.count("\n") >= 2:
                records.append({"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ask}],
                                "chosen": code, "rejected": _corrupt(code)})
    random.Random(0).shuffle(records)
    return records


def write_builtin(layout: str, folder: Path) -> Path:
    """The built-in records as jsonl in `folder` (written once; the name says what made it)."""
    return publish_once(Path(folder).expanduser() / f"builtin-{layout}-v2.jsonl", lambda tmp: tmp.write_text(
        "".join(json.dumps(r) + "\n" for r in builtin_records(layout))))
