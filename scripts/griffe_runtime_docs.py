"""A griffe extension for the documentation site (mkdocs.yml): docstrings built at import.

``cupylars.optim.LARS``, ``LARS8bit`` and ``LARS32bit`` assign ``__doc__`` from one
template, which static analysis cannot read. For a class without a static docstring this
takes the one Python sees at run time, so the reference shows what ``help()`` shows.
"""

from __future__ import annotations

import importlib
from typing import Any

import griffe


class RuntimeDocstrings(griffe.Extension):
    """Fill in missing class docstrings from the imported class's ``__doc__``."""

    def on_class_members(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        if cls.docstring is not None:
            return
        try:
            obj = getattr(importlib.import_module(cls.module.path), cls.name)
        except (ImportError, AttributeError):
            return
        doc = obj.__dict__.get("__doc__")  # the class's own, not a base class's
        if doc:
            cls.docstring = griffe.Docstring(doc, parent=cls)
