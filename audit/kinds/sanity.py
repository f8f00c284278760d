"""The ``sanity`` check kind (top-level spec key ``sanity``): one ``spec.yaml::sanity`` item per spec.

It asks whether the explainer explains the model at all (Adebayo et al. 2018, the model-parameter
randomisation test, :mod:`audit.sanity`): the maps of the spec's images are recomputed with the
model's layers re-initialised from the output down to the CAM layer, on a copy of the model, and must
change (mean Spearman rank correlation with the trained maps at most ``threshold``). Opt-in per spec,
because it costs one forward of the spec's images per randomised layer.

Unlike the case kinds this one runs the model itself (``check_spec`` gets the session): the
randomised copies cannot share the cases' forward pass.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from audit.checks import CheckResult, Metric
from audit.errors import AuditError
from audit.kinds.base import CheckKind

DEFAULT_MAX_IMAGES = 16

SCHEMA: dict[str, Any] = {
    "description": "Model-parameter randomisation test of the heatmaps (opt-in): true, or its settings.",
    "anyOf": [
        {"type": "boolean"},
        {"type": "object", "additionalProperties": False,
         "properties": {
             "threshold": {"type": "number", "minimum": -1, "maximum": 1,
                           "description": "Highest allowed mean rank correlation with the trained maps (0.5)."},
             "seed": {"type": "integer", "minimum": 0, "description": "Seed of the re-initialisation."},
             "max_images": {"type": "integer", "minimum": 1,
                            "description": f"Use at most this many of the spec's images ({DEFAULT_MAX_IMAGES})."}}},
    ],
}


@dataclasses.dataclass(frozen=True)
class SanityConfig:
    threshold: float = 0.5
    seed: int = 0
    max_images: int = DEFAULT_MAX_IMAGES


class SanityKind(CheckKind):
    name = "sanity"
    key = "sanity"
    schema = SCHEMA
    scope = "spec"
    order = 90

    def parse(self, raw: Any, ctx: Any) -> SanityConfig | None:
        if raw is False or raw is None:
            return None
        if raw is True:
            return SanityConfig()
        return SanityConfig(threshold=float(raw.get("threshold", 0.5)), seed=int(raw.get("seed", 0)),
                            max_images=int(raw.get("max_images", DEFAULT_MAX_IMAGES)))

    def applies(self, case: Any, run: Any) -> bool:
        return False

    def applies_to_spec(self, spec: Any, run: Any) -> bool:
        return getattr(spec, "checks", {}).get(self.name) is not None

    def check_spec(self, spec: Any, session: Any) -> CheckResult:
        import torch  # the randomised copies are models: this kind runs them

        from audit.images import load_image
        from audit.sanity import parameter_randomisation

        config: SanityConfig = spec.checks[self.name]
        engine = session.engine(spec.model)
        cases = [c for c in spec.cases if c.error is None][: config.max_images]
        if not cases:
            raise AuditError(f"{spec.path}: sanity needs at least one valid case to compute heatmaps on")
        images = [load_image(c.image) for c in cases]
        cam_layer = spec.model.cam_layer or engine.default_cam_layer
        method_kwargs = session._method_kwargs(spec.model) if hasattr(session, "_method_kwargs") else {}
        method = method_kwargs.get("cam_method", "gradcam")
        method = getattr(method, "name", method)   # the engine takes the registered method object
        preprocess = spec.model.preprocess
        prep = engine.loaded.preprocessing[preprocess]
        example = torch.zeros(1, 3, prep.size, prep.size, device=engine.loaded.device)

        def maps_of(module: Any) -> list:
            e = engine if module is engine.module else type(engine)(dataclasses.replace(engine.loaded, module=module))
            found = e.explain(images, top_k=1, cam_layer=cam_layer, preprocess=preprocess,
                              batch_size=len(images), **method_kwargs)
            return [x.cams_lowres[x.top_k[0].index] for x in found]

        result = parameter_randomisation(engine.module, cam_layer, example, maps_of,
                                         threshold=config.threshold, seed=config.seed)
        metric = Metric("rank_correlation", round(result.final, 6), config.threshold, "<=", result.passed)
        return CheckResult("sanity", result.passed, result.message(method), (metric,))


KIND = SanityKind()
