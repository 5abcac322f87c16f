"""head-surgeon engine: model loading (the bundled organism by default), head diagnosis and surgery, as a library.

    from engine import load_model, diagnose, builtin_prompts
    report = diagnose(load_model("bigscience/bloom-560m"), builtin_prompts())
    report.sick()            # [(layer, head), ...]

    from engine import SurgeryPlan, SurgeryJob, TrainConfig, CorpusSpec, run_job
    job = SurgeryJob([SurgeryPlan(report.sick())], CorpusSpec("notes.txt"), TrainConfig(steps=200))
    run_job(loaded, job, "runs/r1", prompts=builtin_prompts())   # patch.safetensors + report.json

Never imports textual; long work reports through `engine.events` sinks.
"""

from .corpus import CorpusSpec, load_corpus
from .diagnosis import DiagnosisSettings, diagnose
from .errors import HeadSurgeonError
from .evaluate import EvalSettings
from .model import LoadedModel, load_model
from .operation import SurgeryJob, run_job
from .patch import apply_head_tensors, export_model, load_patch
from .prompts import builtin_prompts, load_prompts
from .report import HeadReport, Thresholds
from .session import Session, SessionRecorder
from .spec import format_heads, parse_heads
from .surgery import SurgeryPlan, operate
from .train import TrainConfig

__all__ = [
    "CorpusSpec", "DiagnosisSettings", "EvalSettings", "HeadReport", "HeadSurgeonError", "LoadedModel", "Session",
    "SessionRecorder", "SurgeryJob", "SurgeryPlan", "Thresholds", "TrainConfig", "apply_head_tensors",
    "builtin_prompts", "diagnose", "export_model", "format_heads", "load_corpus", "load_model", "load_patch",
    "load_prompts", "operate", "parse_heads", "run_job",
]
