"""Pipeline steps. Each module has ``register(registry)``; :func:`default_registry` wires them all."""

from __future__ import annotations

from processor.pipeline.registry import StepRegistry


def default_registry() -> StepRegistry:
    from processor.steps import anomaly, caption, ctclip, ensemble, quantify, render, series, util, volume

    registry = StepRegistry()
    for module in (series, util, volume, quantify, render, ctclip, caption, ensemble, anomaly):
        module.register(registry)
    return registry
