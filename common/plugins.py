"""Plugins: modules named in `VLA_PLUGINS` that register tasks or model kinds when imported.

    VLA_PLUGINS=my_tasks,my_policy vla-generate demos --tasks my_task ...

The registries (`data_prep.tasks`, `model_kinds`) call `load_plugins()` before they are read, so every command line,
and every worker process it starts (they inherit the environment), sees the same tasks and kinds. The one import
by name in the project: the plugins build on the registries, so the registries cannot import them by statement.
"""

from __future__ import annotations

import importlib
import os

from common.errors import UserError

ENV_VAR = "VLA_PLUGINS"
_loaded: set[str] = set()


def plugin_names() -> list[str]:
    """The module names in $VLA_PLUGINS (comma-separated, blanks ignored), in order."""
    return [name.strip() for name in os.environ.get(ENV_VAR, "").split(",") if name.strip()]


def load_plugins() -> None:
    """Import each plugin module once per process (a module that is being imported counts as loaded)."""
    for name in plugin_names():
        if name in _loaded:
            continue
        _loaded.add(name)  # before the import: a plugin that reads a registry while it registers must not recurse
        try:
            importlib.import_module(name)
        except ImportError as err:
            _loaded.discard(name)
            raise UserError(f"{ENV_VAR}: cannot import plugin module {name!r} ({err}); is its folder on PYTHONPATH?") from None
