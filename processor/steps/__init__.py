"""Pipeline steps. Each module has ``register(registry)``; :func:`default_registry` wires them all."""

from __future__ import annotations

from processor.pipeline.registry import StepRegistry


def default_registry() -> StepRegistry:
    from processor.steps import quantify, render, series, util, volume

    registry = StepRegistry()
    for module in (series, util, volume, quantify, render):
        module.register(registry)
    return registry
