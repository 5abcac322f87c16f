"""head-surgeon engine: model loading (the bundled organism by default), head diagnosis and surgery, as a library.

    from engine import load_model, diagnose, builtin_prompts
    report = diagnose(load_model("bigscience/bloom-560m"), builtin_prompts())
    report.sick()            # [(layer, head), ...]

    from engine import SurgeryPlan, SurgeryJob, TrainConfig, CorpusSpec, run_job
    job = SurgeryJob([SurgeryPlan(report.sick())], CorpusSpec("notes.txt"), TrainConfig(steps=200))
    run_job(loaded, job, "runs/r1")   # patch.safetensors + report.json + events through a sink

Never imports textual; long work reports through `engine.events` sinks.
"""

import importlib

_EXPORTS = {
    "CorpusSpec": "corpus", "load_corpus": "corpus", "DiagnosisSettings": "diagnosis", "diagnose": "diagnosis",
    "HeadSurgeonError": "errors", "EvalSettings": "evaluate", "LoadedModel": "model", "load_model": "model",
    "SurgeryJob": "operation", "run_job": "operation", "apply_head_tensors": "patch", "export_model": "patch",
    "load_patch": "patch", "builtin_prompts": "prompts", "load_prompts": "prompts", "HeadReport": "report",
    "Thresholds": "report", "Session": "session", "format_heads": "spec", "parse_heads": "spec",
    "SurgeryPlan": "surgery", "operate": "surgery", "TrainConfig": "train", "JobInputs": "workflow",
    "read_events": "eventlog", "run_state": "runner", "list_runs": "runner",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import on first use: `python -m engine.runner` and the CLI start without loading torch."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
