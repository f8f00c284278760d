"""The ``prediction`` check kind (spec key ``expect``): the labels the model must (not) rank in its top-k."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from audit import checks
from audit.kinds.base import CheckKind, Needs


@dataclass(frozen=True, slots=True)
class Expect:
    """Prediction expectations; labels stay raw (a name or an index): the model resolves them."""

    top1: str | int | None = None
    in_top_k: tuple[str | int, ...] = ()
    any_in_top_k: tuple[str | int, ...] = ()
    not_in_top_k: tuple[str | int, ...] = ()
    min_prob: float | None = None
    top1_is_label: bool = False


def _label_key(label: str | int) -> str | int:
    return label.strip().lower() if isinstance(label, str) else label


class PredictionKind(CheckKind):
    name = "prediction"
    key = "expect"
    schema = {"$ref": "#/$defs/expect"}
    order = 10

    def parse(self, raw: Any, ctx: Any) -> Expect | None:
        if not raw:
            return None
        expect = Expect(top1=raw.get("top1"), in_top_k=tuple(raw.get("in_top_k", ())),
                        any_in_top_k=tuple(raw.get("any_in_top_k", ())),
                        not_in_top_k=tuple(raw.get("not_in_top_k", ())),
                        min_prob=float(raw["min_prob"]) if raw.get("min_prob") is not None else None,
                        top1_is_label=bool(raw.get("top1_is_label", False)))
        if expect.top1_is_label and not getattr(ctx, "labels", ()):
            ctx.error("expect.top1_is_label", "top1_is_label needs a case with a label: only cases read from "
                                              "a dataset (dataset:) have one; write top1 for a hand-written case")
        required = set(map(_label_key, expect.in_top_k))
        if expect.top1 is not None:
            required.add(_label_key(expect.top1))
        if len(required) > ctx.top_k:
            ctx.error("expect.in_top_k", f"{len(required)} different labels must be in the top-k but top_k is "
                                         f"{ctx.top_k}")
        clash = [label for label in expect.not_in_top_k if _label_key(label) in required]
        if clash:
            ctx.error("expect.not_in_top_k", f"{clash[0]!r} is both required and forbidden in the top-k")
        return expect

    def applies(self, case: Any, run: Any) -> bool:
        # a case that asks for nothing still gets its prediction item: it shows what the model did
        return case.checks.get(self.name) is not None or not any(
            v is not None for k, v in case.checks.items() if k != self.name)

    def prepare(self, config: Expect | None, case: Any, model: Any) -> checks.PredictionExpectation | None:
        if config is None:
            return None

        def many(name: str) -> tuple[int, ...]:
            return tuple(model.resolve_class(label, f"expect.{name}[{i}]")
                         for i, label in enumerate(getattr(config, name)))

        top1 = model.resolve_class(config.top1, "expect.top1") if config.top1 is not None else None
        top1_any: tuple[int, ...] = ()
        if config.top1_is_label:   # the dataset's class, mapped to model labels (labels_map: any of them)
            top1_any = tuple(dict.fromkeys(model.resolve_class(label, "expect.top1_is_label")
                                           for label in case.labels))
        return checks.PredictionExpectation(
            top_k=case.top_k, top1=top1, in_top_k=many("in_top_k"), any_in_top_k=many("any_in_top_k"),
            not_in_top_k=many("not_in_top_k"), min_prob=config.min_prob, top1_any=top1_any,
            top1_any_label=str(case.label) if config.top1_is_label else "")

    def check(self, prepared: checks.PredictionExpectation | None, observation: Any) -> checks.CheckResult:
        expectation = prepared or checks.PredictionExpectation(top_k=observation.case.top_k)
        return checks.check_prediction(observation.explanation.top_k, expectation, observation.label)

    def expected_labels(self, prepared: checks.PredictionExpectation | None) -> tuple[int, ...]:
        if prepared is None:
            return ()
        return tuple(i for i in (prepared.top1, *prepared.top1_any, *prepared.in_top_k, *prepared.any_in_top_k)
                     if i is not None)

    def needs(self, prepared: Any) -> Needs:
        return Needs()


KIND = PredictionKind()
