"""Griffe extension for the API pages: an ``Example:`` section is rendered as doctest code.

The library's docstrings head their doctests ``Example:`` (Google style allows both spellings); griffe
reads only ``Examples:`` as doctest code and would render ``Example:`` as Markdown prose, in which
``>>> batch["ids"][0]`` turns into a broken link. This renames the heading before griffe parses it.
"""

import re
from typing import Any

import griffe

_EXAMPLE_HEADING = re.compile(r"^(\s*)Example:\s*$", flags=re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Read every ``Example:`` docstring section as an ``Examples:`` section (doctest code)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE_HEADING.sub(r"\1Examples:", obj.docstring.value)
