"""PEP 562 module attributes that import on first use, so ``import mdm`` stays instant.

``import mdm`` loads no torch: ``mdm.models``, ``mdm.train.pretrain`` or ``mdm.create_model`` import
their module the first time they are read, and the value is then cached in the module's namespace.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing

if TYPE_CHECKING:
    from typing import Any


def lazy_attributes(
    namespace: dict[str, Any],
    submodules: Iterable[str] | None = None,
    shortcuts: dict[str, str] | None = None,
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for the package whose globals are ``namespace``.

    Args:
        namespace: the package's ``globals()``.
        submodules: names of sub-modules/packages reachable as attributes (``mdm.models``); ``None``:
            every public module of the package, found on its ``__path__`` when first asked for.
        shortcuts: attribute → ``"module:name"`` (``create_model`` → ``"mdm.models:create_model"``).
    """
    package, shortcuts = namespace["__name__"], dict(shortcuts or {})
    fixed = tuple(submodules) if submodules is not None else None

    def names() -> tuple[str, ...]:
        if fixed is not None:
            return fixed
        import pkgutil

        return tuple(
            m.name for m in pkgutil.iter_modules(namespace["__path__"]) if not m.name.startswith("_")
        )

    def __getattr__(name: str) -> Any:
        if name in shortcuts:
            module, _, attr = shortcuts[name].partition(":")
            value = getattr(importlib.import_module(module), attr)
        elif not name.startswith("_") and name in names():
            value = importlib.import_module(f"{package}.{name}")
        else:
            import difflib

            close = difflib.get_close_matches(name, [*names(), *shortcuts], n=1)
            hint = f"; did you mean {package}.{close[0]}?" if close else ""
            raise AttributeError(f"module {package!r} has no attribute {name!r}{hint}")
        namespace[name] = value  # later reads are plain attribute lookups
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *names(), *shortcuts})

    return __getattr__, __dir__
