"""A tiny name -> object registry that also feeds the CLI's choices.

Registries (``MODELS``, ``ESTIMATORS``, ``REGULARIZERS``, ``DATASETS``...) map a public name to a
factory. Unknown names raise :class:`~marginlab.base.errors.ConfigError` listing the valid ones.
"""

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from marginlab.base.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Map names to objects; ``what`` names the kind of thing in error messages."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REG.register("name")`` adds the decorated object under ``name``."""

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        """Add ``obj`` under ``name``; a name registered twice raises ``ValueError``."""
        if name in self._items:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._items[name] = obj

    def get(self, name: str) -> T:
        """The object registered as ``name``; an unknown name raises :class:`ConfigError` naming the known."""
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.what} {name!r}; choose from: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """The registered names, sorted (what the CLI offers as choices)."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
