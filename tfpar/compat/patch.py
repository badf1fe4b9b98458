"""What a compatibility patch is: a name, its upstream issue, the versions it was verified on."""

from __future__ import annotations

import dataclasses
from typing import Callable

import keras

# Keras releases every patch was verified on (3.15.1); setup.cfg pins Keras
# below 3.16 so that a new release is checked before it is used.
VERIFIED = ((3, 0), (3, 16))


class CompatError(RuntimeError):
    """Keras no longer has an internal that a tfpar strategy is built on."""


def keras_version() -> tuple[int, int]:
    major, minor = keras.__version__.split(".")[:2]
    return int(major), int(minor)


@dataclasses.dataclass(frozen=True)
class Patch:
    """One patch of Keras or TensorFlow.

    Attributes:
      name: what `tfpar.compat.remove_keras_fixes` takes.
      kind: "fix" (an upstream bug; skipped outside `verified`) or
        "mechanism" (how a tfpar strategy works; never skipped).
      upstream: the upstream issue(s), or why Keras has no hook.
      install / uninstall: put the patch in place / restore upstream.
      requires: "module:attribute" paths of the Keras internals it replaces;
        `check()` fails with the fix if one is missing.
      verified: [low, high) Keras (major, minor) versions.
    """

    name: str
    kind: str
    upstream: str
    install: Callable[[], None]
    uninstall: Callable[[], None]
    requires: tuple[str, ...] = ()
    verified: tuple[tuple[int, int], tuple[int, int]] = VERIFIED

    def __post_init__(self):
        if self.kind not in ("fix", "mechanism"):
            raise ValueError(f"Patch {self.name!r}: kind={self.kind!r}; use 'fix' or 'mechanism'.")

    @property
    def verified_range(self) -> str:
        (a, b), (c, d) = self.verified
        return f"{a}.{b} <= version < {c}.{d}"

    def verified_for(self, version: tuple[int, int]) -> bool:
        low, high = self.verified
        return low <= version < high

    def check(self) -> None:
        """Raises CompatError unless every internal in `requires` exists."""
        import importlib

        for path in self.requires:
            module_name, _, attribute = path.partition(":")
            target = importlib.import_module(module_name)
            for part in attribute.split(".") if attribute else ():
                target = getattr(target, part, None)
                if target is None:
                    raise CompatError(
                        f"tfpar's {self.name!r} ({self.upstream}) needs {path}, which Keras "
                        f"{keras.__version__} does not have; tfpar was verified for Keras "
                        f"{self.verified_range}. Install a verified Keras "
                        "(pip install 'keras>=3.15,<3.16') or a tfpar release for this Keras.")
