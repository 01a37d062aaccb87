"""The built-in corpus: the Python standard library's own top-level modules, which every Python
installation has, so that the demo, the tests and the built-in task need no download. Here: the
files, and the instruction data (SFT conversations and preference pairs) derived from them.
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
from pathlib import Path


def default_corpus_files() -> list[Path]:
    """The built-in corpus: the standard library's top-level Python modules: real English prose in
    code, comments and docstrings, about 5 MB, that every Python installation has; sorted."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


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
    path = Path(folder).expanduser() / f"builtin-{layout}-v2.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{random.randrange(1 << 30)}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in builtin_records(layout)))
        tmp.rename(path)
    return path
