"""Routing rules: which studies are analysed, which series, with which model
profile. Studies no rule accepts are stored and their job is ``skipped`` with
the reason.

Rules come from ``[[routing]]`` tables, tried in order::

    [[routing]]
    name = "brain-mr"
    modality = ["MR"]                 # any of (empty: any)
    body_part = []                    # any of, case-insensitive (empty: any)
    series_description = "FLAIR|T2"   # regular expression (empty: any)
    calling_aet = ""                  # regular expression (empty: any)
    min_instances = 3                 # smallest series worth analysing
    profile = "default"               # engine profile ([engine.profiles.NAME])

Without rules, every CT or MR study is analysed with the default profile.
The series analysed is the largest image series the rule accepts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pacs_node.db.models import Series, Study

__all__ = ["Route", "RoutingRule", "Skip", "choose_route", "parse_rules"]

# SOP classes of derived objects that are never analysed (SEG, SR, PR, KO...).
_NOT_IMAGES = {"SEG", "SR", "PR", "KO", "DOC", "REG", "RTSTRUCT", "RWV", "OT"}


class RoutingRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "default"
    modality: list[str] = Field(default_factory=lambda: ["CT", "MR"])
    body_part: list[str] = Field(default_factory=list)
    series_description: str = ""
    calling_aet: str = ""
    min_instances: int = Field(default=3, ge=1)
    profile: str = "default"

    @field_validator("series_description", "calling_aet")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from None
        return v


@dataclass(frozen=True)
class Route:
    rule: str
    profile: str
    series_uid: str


@dataclass(frozen=True)
class Skip:
    reason: str


def parse_rules(raw: Sequence[dict[str, object]]) -> list[RoutingRule]:
    """Validate ``[[routing]]`` tables (raises pydantic.ValidationError)."""
    return [RoutingRule.model_validate(r) for r in raw] or [RoutingRule()]


def _series_ok(rule: RoutingRule, series: Series) -> bool:
    modality = (series.modality or "").upper()
    if modality in _NOT_IMAGES:
        return False
    if rule.modality and modality not in {m.upper() for m in rule.modality}:
        return False
    if rule.body_part and (series.body_part_examined or "").upper() not in {b.upper() for b in rule.body_part}:
        return False
    if rule.series_description and not re.search(rule.series_description, series.series_description or "", re.I):
        return False
    return series.num_instances >= rule.min_instances


def choose_route(rules: Sequence[RoutingRule], study: Study, series: Sequence[Series]) -> Route | Skip:
    """The first rule that accepts the study, with the series to analyse."""
    reasons = []
    for rule in rules:
        if rule.calling_aet and not re.search(rule.calling_aet, study.calling_aet or ""):
            reasons.append(f"{rule.name}: calling AE does not match")
            continue
        candidates = [s for s in series if _series_ok(rule, s)]
        if not candidates:
            reasons.append(f"{rule.name}: no matching series")
            continue
        best = max(candidates, key=lambda s: (s.num_instances, -(s.series_number or 0)))
        return Route(rule=rule.name, profile=rule.profile, series_uid=best.series_instance_uid)
    return Skip("not routed: " + "; ".join(reasons))
