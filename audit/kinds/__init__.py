"""Check kinds: one module per kind (see :mod:`audit.kinds.base`), registered in :mod:`audit.registry`."""
from audit.kinds.base import (CheckKind, ModelContext, Needs, NotRecorded, ParseContext, Picture, RunContext,
                              ShownRegion, Variant)

__all__ = ["CheckKind", "ModelContext", "Needs", "NotRecorded", "ParseContext", "Picture", "RunContext", "ShownRegion", "Variant"]
