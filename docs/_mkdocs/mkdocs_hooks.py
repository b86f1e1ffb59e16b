"""MkDocs hooks of the docs site (``hooks:`` in mkdocs.yml).

- Nav entries outside ``docs/`` (``../benchmarks/RESULTS.md``) become pages. The pages link to repository
  files outside ``docs/`` by their relative path, which works on GitHub; MkDocs only knows files under
  ``docs_dir``. Each such nav entry is added as a page at its repository path (``benchmarks/RESULTS/``),
  so the same links resolve on the site, and so do the links between such files. A link to a file
  outside ``docs/`` that is not in the nav stays an error of ``--strict`` builds.
- The notebooks (``notebooks/*.ipynb``, `DOWNLOADS`) are copied to the site as files to download, at their
  repository path, so the pages' links to them resolve too.
- Code-fence words meant for the test runner are dropped before the fences are parsed (after
  pymdownx.snippets has included other files, so included fences are cleaned too). pytest-markdown-docs
  reads ```` ```python fixture:llava_data ```` (run with that fixture); pymdownx.superfences takes only
  ``key=value`` options after the language and would not see a code block at all.
"""

from __future__ import annotations

import glob
import posixpath
import re
from typing import Any

from markdown import Markdown
from markdown.extensions import Extension
from markdown.preprocessors import Preprocessor
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files, InclusionLevel

# Repository files outside ``docs/`` that pages link to and the site serves as downloads (not pages).
DOWNLOADS = ("../notebooks/*.ipynb",)

# An opening or closing fence: indent, ``` or ~~~ (3 or more), the info string.
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def nav_paths(nav: Any) -> list[str]:
    """Every page path of the ``nav`` setting (titles dropped, sections walked)."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [path for value in nav.values() for path in nav_paths(value)]
    if isinstance(nav, list):
        return [path for item in nav for path in nav_paths(item)]
    return []


def on_files(files: Files, config: MkDocsConfig) -> Files:
    taken = {file.dest_uri for file in files}
    downloads = [
        posixpath.relpath(found, config.docs_dir)
        for pattern in DOWNLOADS
        for found in sorted(glob.glob(posixpath.join(config.docs_dir, pattern)))
    ]
    for path in nav_paths(config.nav) + downloads:
        if not path.startswith("../") or files.get_file_from_path(path) is not None:
            continue
        inside = posixpath.normpath(path)
        while inside.startswith("../"):
            inside = inside[3:]
        where = File(inside, None, config.site_dir, config.use_directory_urls)  # where it would be in docs/
        if where.dest_uri in taken:
            raise PluginError(f"nav entry {path!r} would be written to {where.dest_uri}, which a docs page uses")
        # Included explicitly: the default exclusion of dot paths (``.*``) would match its ``../``.
        file = File(
            *(path, config.docs_dir, config.site_dir, config.use_directory_urls),
            dest_uri=where.dest_uri,
            inclusion=InclusionLevel.INCLUDED,
        )
        files.append(file)
        taken.add(file.dest_uri)
    return files


def clean_fences(lines: list[str]) -> list[str]:
    """``lines`` with each opening fence keeping its language and ``key=value`` options only."""
    lines, open_fence = list(lines), None
    for i, line in enumerate(lines):
        match = _FENCE.match(line)
        if match is None:
            continue
        fence, info = match["fence"], match["info"].split()
        if open_fence is None:
            open_fence = fence
            if len(info) > 1:
                kept = [info[0], *(word for word in info[1:] if "=" in word)]
                lines[i] = match["indent"] + fence + " ".join(kept)
        elif fence[0] == open_fence[0] and len(fence) >= len(open_fence) and not info:
            open_fence = None
    return lines


class _CleanFences(Preprocessor):
    def run(self, lines: list[str]) -> list[str]:
        return clean_fences(lines)


class _CleanFencesExtension(Extension):
    def extendMarkdown(self, md: Markdown) -> None:  # noqa: N802 (Markdown's name)
        # After pymdownx.snippets (priority 32), before whitespace normalisation (30) and the fences (25).
        md.preprocessors.register(_CleanFences(md), "llava_loop_clean_fences", 31)


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    config.markdown_extensions.append(_CleanFencesExtension())
    return config
