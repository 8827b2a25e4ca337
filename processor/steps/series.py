"""Series step ``dicom.select_series``: pick one series per study, with a score and a reason for each.

The rules themselves are in :mod:`processor.dicom.select`; this step turns its ``with:`` block into
:class:`~processor.dicom.select.SelectionRules`, records every series in
``result["series_selection"]`` and provides the chosen :class:`~processor.dicom.scan.Series`.
"""

from __future__ import annotations

import logging
import re

from pydantic import Field, field_validator

from processor.dicom.select import DEFAULT_LUNG_KERNELS, SelectionRules, evaluate, series_facts
from processor.dicom.stack import image_stack
from processor.errors import StepError
from processor.pipeline.registry import StepRegistry
from processor.pipeline.step import Params, Step, StudyContext
from processor.steps.ports import SERIES

log = logging.getLogger(__name__)

MAX_LISTED = 50  # set-aside files named in the JSON (all are counted)


class SelectParams(Params):
    modality: str = "CT"
    min_slices: int = Field(20, ge=1)
    axial_tolerance_deg: float = Field(30.0, ge=0, le=90)
    max_thickness_mm: float = Field(5.0, gt=0)
    lung_kernels: list[str] = Field(default_factory=lambda: list(DEFAULT_LUNG_KERNELS))

    @field_validator("lung_kernels")
    @classmethod
    def _patterns_compile(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"{pattern!r} is not a valid regular expression ({exc}); "
                    "write e.g. 'B7\\d[fs]?' or quote plain names like 'LUNG'"
                ) from exc
        return value

    def rules(self) -> SelectionRules:
        return SelectionRules(
            modality=self.modality,
            min_slices=self.min_slices,
            axial_tolerance_deg=self.axial_tolerance_deg,
            max_thickness_mm=self.max_thickness_mm,
            lung_kernels=tuple(self.lung_kernels),
        )


class SelectSeries(Step):
    uses = "dicom.select_series"
    summary = (
        "Choose the series to analyse: CT, axial, not a scout, consistent geometry, ≥ min_slices; "
        "then ORIGINAL, thin, lung kernel, coverage, count — every series listed with its reason."
    )
    Params = SelectParams
    provides = (SERIES,)

    def run(self, ctx: StudyContext) -> None:
        params: SelectParams = self.params  # type: ignore[assignment]
        stacks = {uid: image_stack(series) for uid, series in ctx.study.series.items()}
        verdicts = evaluate(
            [series_facts(s, stacks[uid]) for uid, s in ctx.study.series.items()], params.rules()
        )
        rows = [v.row() for v in verdicts]
        chosen = verdicts[0] if verdicts and verdicts[0].eligible else None
        selection: dict = {"chosen": chosen.facts.uid if chosen else None, "series": rows}
        ctx.result["series_selection"] = selection
        for v in verdicts:
            log.info(
                "series.verdict study=%s series=%s rank=%s score=%s reason=%r set_aside=%s",
                ctx.label,
                v.facts.number,
                v.rank,
                v.score,
                v.reason,
                v.facts.set_aside or "{}",
            )
        if chosen is None:
            raise StepError(
                "no eligible series: "
                + "; ".join(
                    f"series {r['number']} ({r['description'] or 'no description'}): {r['reason']}"
                    for r in rows
                )
                + ". Fix: include the original axial CT series (≥ min_slices images) in the export, "
                "or relax the dicom.select_series rules in the pipeline YAML"
            )
        stack = stacks[chosen.facts.uid]
        aside = (
            chosen.facts.set_aside
        )  # whole instances, and frames of another stack inside a multi-frame file
        selection["set_aside"] = dict(aside)
        if aside:
            selection["set_aside_files"] = [
                {"file": name, "reason": reason} for name, reason in stack.set_aside_files[:MAX_LISTED]
            ]
            ctx.warnings.append(
                f"series {chosen.facts.number}: {sum(aside.values())} image(s) under the same "
                "SeriesInstanceUID set aside ("
                + ", ".join(f"{reason}: {n}" for reason, n in sorted(aside.items()))
                + f"); the image stack of {chosen.facts.image_count} image(s) was used"
            )
        if chosen.facts.thickness_mm is None:
            ctx.warnings.append(
                f"series {chosen.facts.number}: slice thickness {chosen.facts.thickness_words()}"
            )
        ctx.values["series"] = ctx.study.series[chosen.facts.uid]  # ct.volume sets the same instances aside
        log.info(
            "series.chosen study=%s series=%s slices=%d kernel=%s thickness=%s",
            ctx.label,
            chosen.facts.number,
            chosen.facts.slice_count,
            chosen.facts.kernel,
            chosen.facts.thickness_mm,
        )


def register(registry: StepRegistry) -> None:
    registry.register(SelectSeries)
