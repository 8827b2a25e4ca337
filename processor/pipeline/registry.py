"""The step registry: an object (not a module global) mapping YAML ``uses`` names to step classes."""

from __future__ import annotations

import difflib

from processor.pipeline.step import Step


class StepRegistry:
    def __init__(self) -> None:
        self._steps: dict[str, type[Step]] = {}

    def register(self, cls: type[Step]) -> type[Step]:
        """Register a step class under ``cls.uses``; a name registered twice is a programming error."""
        name = cls.uses
        if name in self._steps:
            raise ValueError(
                f"step name {name!r} registered twice ({self._steps[name].__qualname__} "
                f"and {cls.__qualname__})"
            )
        if not cls.summary:
            raise ValueError(f"step {name!r} has no summary; every step is documented")
        self._steps[name] = cls
        return cls

    def get(self, name: str) -> type[Step] | None:
        return self._steps.get(name)

    def names(self) -> list[str]:
        return sorted(self._steps)

    def closest(self, name: str) -> list[str]:
        return difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)

    def __contains__(self, name: str) -> bool:
        return name in self._steps

    def items(self) -> list[tuple[str, type[Step]]]:
        return sorted(self._steps.items())
