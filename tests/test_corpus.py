"""The built-in corpus's two domains (builtin:code, builtin:prose) and publish_once."""

import ast
import io
import os
import tokenize

import pytest

from solarjax.data import corpus
from solarjax.data.config import DataConfig
from solarjax.errors import ConfigError
from solarjax.files import publish_once

MODULE = '''#!/usr/bin/env python
"""Module doc.

More words."""
import os  # the os module
# ----------------
# A comment block
# over two lines.

class A(Exception):
    """Only a doc."""

def f(x):  # trailing
    """Doc of f."""
    y = "not a doc"  # inline
    return x + 1


def g(): """same line"""; return 2
'''


def test_a_module_splits_into_code_and_prose():
    code, prose = corpus.split_module(MODULE)
    assert code == ('#!/usr/bin/env python\nimport os\n\nclass A(Exception):\n    pass\n\ndef f(x):\n'
                    '    y = "not a doc"\n    return x + 1\n\ndef g(): """same line"""; return 2\n')
    assert prose == ("Module doc.\n\nMore words.\n\nthe os module\n\nA comment block over two lines.\n\n"
                     "Only a doc.\n\ntrailing\n\nDoc of f.\n\ninline\n")


class _NoDocstrings(ast.NodeTransformer):
    """The module's syntax tree without docstrings (a body left empty gets `pass`), by ast alone."""

    def _strip(self, node):
        self.generic_visit(node)
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or ([] if isinstance(node, ast.Module) else [ast.Pass()])
        return node

    visit_Module = visit_ClassDef = visit_FunctionDef = visit_AsyncFunctionDef = _strip


def test_the_code_domain_is_every_module_less_its_docstrings():
    """Independently of the splitter's line handling: each module's code parses to the original's
    syntax tree without docstrings (comments are not in the tree), and no comment is left in it.
    Every 4th module (all of them take ~30 s), and two that once broke it: blank lines inside a
    string (cgitb) and "#" at the start of a string's line (_pydecimal)."""
    files = corpus.default_corpus_files()
    for path in files[::4] + [f for f in files if f.stem in ("cgitb", "_pydecimal")]:
        text = path.read_text(encoding="utf-8")
        code, prose = corpus.split_module(text)
        want = ast.dump(_NoDocstrings().visit(ast.parse(text)))
        assert ast.dump(ast.parse(code)) == want, path
        doc = ast.get_docstring(ast.parse(text))
        if doc and doc.strip():
            assert doc.strip() in prose, path
        comments = [t.string for t in tokenize.generate_tokens(io.StringIO(code).readline) if t.type == tokenize.COMMENT]
        assert all(c.startswith("#!") or "coding" in c for c in comments), (path, comments[:3])


def test_builtin_paths_are_written_once(tmp_path):
    code = corpus.builtin_paths("builtin:code", tmp_path)
    prose = corpus.builtin_paths("builtin:prose", tmp_path)
    assert len(code) == len(corpus.default_corpus_files()) > 100 and 100 < len(prose) <= len(code)
    stamp = [f.stat().st_mtime_ns for f in code]
    assert corpus.builtin_paths("builtin:code", tmp_path) == code
    assert [f.stat().st_mtime_ns for f in code] == stamp  # the second call wrote nothing
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    assert corpus.builtin_paths("builtin", tmp_path) == corpus.default_corpus_files()
    assert corpus.builtin_domain("corpus/builtin.txt", "x") is None


@pytest.mark.parametrize("data, message", [
    ({"sources": [{"name": "code", "path": "builtin:cod"}]},
     "data.sources (code): unknown built-in corpus 'builtin:cod'; expected builtin (all of it) or one of its "
     "domains: builtin:code, builtin:prose"),
    ({"sources": ["builtin:prose"], "validation": {"held": "builtin:docs"}},
     "data.validation (held): unknown built-in corpus 'builtin:docs'"),
])
def test_an_unknown_builtin_domain_is_refused(data, message):
    with pytest.raises(ConfigError) as e:
        DataConfig(**data)
    assert message in str(e.value)


def test_publish_once(tmp_path):
    calls = []

    def write(tmp):
        calls.append(tmp)
        tmp.mkdir()
        (tmp / "a").write_text("1")

    final = tmp_path / "out"
    assert publish_once(final, write) == final and (final / "a").read_text() == "1"
    assert publish_once(final, write) == final and len(calls) == 1  # there already: not written again

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        publish_once(tmp_path / "file", fail)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # neither the output nor a temporary is left

    def late(tmp):  # another process publishes while this one writes: its copy is dropped
        write(tmp)
        write(final.with_name("other"))
        os.rename(final.with_name("other"), tmp_path / "late")
    assert publish_once(tmp_path / "late", late) == tmp_path / "late"
    assert sorted(os.listdir(tmp_path)) == ["late", "out"]

    # A writer killed on this host left its temporary: removed at the next publish of that name
    # (its pid is no process's); another host's is never touched.
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from solarjax.files import _here
    stale = [tmp_path / f".out.tmp-{_here()}-{dead.stdout.strip()}-0123abcd",
             tmp_path / ".out.tmp-another_host_abc123-1-0123abcd",
             # this host name in another PID namespace (a container): its pid means nothing here
             tmp_path / f".out.tmp-{_here()[:-6]}ffffff-{dead.stdout.strip()}-0123abcd"]
    for path in stale:
        path.mkdir()
    written = len(calls)
    assert publish_once(final, write) == final and len(calls) == written  # there already: not written again
    assert sorted(os.listdir(tmp_path)) == sorted([stale[1].name, stale[2].name, "late", "out"])
