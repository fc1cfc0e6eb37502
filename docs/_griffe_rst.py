"""A griffe extension (named in mkdocs.yml): the reStructuredText bits of lsx's docstrings, read as Markdown.

The docstrings are written for ``help()`` and doctest: Google-style sections, ````code```` spans (valid
Markdown), ``.. math::`` directives and ``:func:``/``:mod:``/``:class:`` roles. The directive line is dropped
(its indented formula then renders as a code block) and a role becomes a code span.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_MATH_DIRECTIVE = re.compile(r"^\.\. math::[ \t]*\n", re.MULTILINE)
_ROLE = re.compile(r":(?:func|mod|class|meth|attr|data|obj|exc):`~?([^`]+)`")


def markdown(text: str) -> str:
    """``text`` with ``.. math::`` directive lines removed and Sphinx roles turned into code spans."""
    return _ROLE.sub(r"``\1``", _MATH_DIRECTIVE.sub("", text))


class RstToMarkdown(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
