"""head-surgeon engine: model loading, head diagnosis and the organism, as a library.

    from engine import load_model, diagnose, builtin_prompts
    report = diagnose(load_model("bigscience/bloom-560m"), builtin_prompts())
    report.sick()            # [(layer, head), ...]

Never imports textual; long work reports through `engine.events` sinks.
"""

from .diagnosis import DiagnosisSettings, diagnose
from .errors import HeadSurgeonError
from .model import LoadedModel, load_model
from .prompts import builtin_prompts, load_prompts
from .report import HeadReport, Thresholds
from .spec import format_heads, parse_heads

__all__ = [
    "DiagnosisSettings", "HeadReport", "HeadSurgeonError", "LoadedModel", "Thresholds", "builtin_prompts",
    "diagnose", "format_heads", "load_model", "load_prompts", "parse_heads",
]
