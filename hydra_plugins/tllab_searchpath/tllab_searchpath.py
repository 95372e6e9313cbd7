"""Configs from outside tllab: every entry of ``TLLAB_CONFIG_PATH`` joins Hydra's config search path.

A user's own method lives in their own package, its YAML in their own config dir
(``<dir>/norm/mynorm.yaml`` with ``_target_: mypackage.MyNorm``). Hydra builds the search path
of every command (``tllab-train``, ``tllab-train -m``, ``tllab-sweep``, each job a launcher
starts) and of tllab's own option checks (:func:`tllab.train.check_command_line`) with this
plug-in, so an environment variable reaches all of them alike. Entries are joined by
``os.pathsep``; each is a dir or a ``pkg://module`` (a Python package holding the config groups).
They come after tllab's own configs, so a name tllab ships keeps tllab's meaning.
"""

import os
import re
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

ENV = "TLLAB_CONFIG_PATH"


def config_path_entries(value: str) -> list[str]:
    """The search-path entries of a ``TLLAB_CONFIG_PATH`` value: ``pkg://``/``file://`` entries
    as they are (their ``://`` is no separator, although ``:`` is ``os.pathsep`` on POSIX), a dir
    as ``file://`` with its absolute path (a job started elsewhere finds it too).

    Example (POSIX, where ``os.pathsep`` is ``:``):
        >>> config_path_entries("pkg://mypkg.conf:/home/me/conf")
        ['pkg://mypkg.conf', 'file:///home/me/conf']
    """
    entries = re.split(rf"{re.escape(os.pathsep)}(?!//)", value)
    return [e if re.match(r"\w+://", e) else f"file://{Path(e).absolute()}" for e in entries if e]


class TllabSearchPathPlugin(SearchPathPlugin):
    """Appends the entries of ``TLLAB_CONFIG_PATH`` to Hydra's config search path."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for entry in config_path_entries(os.environ.get(ENV, "")):
            search_path.append(ENV, entry)
