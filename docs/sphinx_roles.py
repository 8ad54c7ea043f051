"""A griffe extension for the API reference (mkdocs.yml): the docstrings name Python objects
with Sphinx roles (:class:`torch.nn.BatchNorm2d`, :mod:`~bncore.nn.batchnorm`), which Markdown
would show as written. Each becomes the code span it stands for (``~`` keeps the last name)."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:mod|func|class|meth|attr|data|obj|exc|const):`(~?)([^`]+)`")


def _plain(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_plain, obj.docstring.value)
