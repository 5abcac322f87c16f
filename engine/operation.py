"""A whole surgery job: baseline measurements, one or two passes, the final patch and report.

    job = SurgeryJob([plan], CorpusSpec("notes.txt"), TrainConfig(steps=200))
    report = run_job(loaded, job, "runs/r1", sink=ConsoleSink(console))
writes runs/r1/patch.safetensors (changed slices only) and runs/r1/report.json. The job's diagnosis
settings (prompts, max length, batch, thresholds) measure the model before, at every evaluation point
and after, so a head that moved did so because of the surgery. A cancelled job stops at a step
boundary, keeps a resumable state and skips the after-evaluation.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .atomic import atomic_write_text
from .corpus import CorpusSpec, PackedCorpus, load_corpus
from .diagnosis import DiagnosisSettings, diagnose, tokenize_prompts
from .errors import InputError
from .evaluate import (EvalSettings, ablation_deltas, completions, drift, iatrogenic, mean_loss, mlp_dormancy,
                       perplexity, prompt_loss, recovery)
from .events import EvalMetrics, NullSink, PhaseChanged, Resumed, RunFinished, Sink, json_safe
from .model import model_identity
from .patch import apply_head_tensors, load_patch, parse_tensor_name, save_patch
from .prompts import load_prompts
from .spec import format_heads
from .report import HeadReport, Thresholds
from .surgery import SurgeryPlan
from .train import STATE_FILE, PassResult, SurgeryRun, TrainConfig

REPORT_FILE = "report.json"
PATCH_FILE = "patch.safetensors"
OPERATION_SCHEMA_VERSION = 1
DONE_FILE = "done.json"


@dataclass
class SurgeryJob:
    """Everything that defines a surgery run, as recorded in sessions and patches."""

    plans: list[SurgeryPlan]
    corpus: CorpusSpec
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    heldout_frac: float = 0.05
    diagnosis: DiagnosisSettings | None = None  # None: defaults with the evaluation's thresholds

    def __post_init__(self) -> None:
        if not self.plans:
            raise InputError("a surgery job needs at least one plan")
        if self.diagnosis is None:
            self.diagnosis = DiagnosisSettings(thresholds=self.evaluation.thresholds)
        self.evaluation.thresholds = self.diagnosis.thresholds  # one set of class boundaries for the whole job

    @property
    def targets(self) -> list[tuple[int, int]]:
        return sorted({t for p in self.plans for t in p.targets})

    @property
    def frozen(self) -> list[tuple[int, int]]:
        return sorted({f for p in self.plans for f in p.frozen} - set(self.targets))

    def to_dict(self) -> dict[str, Any]:
        ev = asdict(self.evaluation)
        return {"plans": [p.to_dict() for p in self.plans], "corpus": asdict(self.corpus), "train": asdict(self.train),
                "evaluation": ev, "heldout_frac": self.heldout_frac, "diagnosis": self.diagnosis.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], adapter, sick=None, report=None) -> "SurgeryJob":
        """Rebuild a recorded job; `report` (a fresh diagnosis with the job's settings) resolves class words
        and predicates its plans kept as words (hand-written example sessions do)."""
        try:
            ev = dict(data.get("evaluation", {}))
            ev["thresholds"] = Thresholds(**ev.get("thresholds", {}))
            diag = data.get("diagnosis")
            return cls(
                plans=[SurgeryPlan.from_dict(p, adapter, sick, report) for p in data["plans"]],
                corpus=CorpusSpec(**data["corpus"]),
                train=TrainConfig(**data.get("train", {})),
                evaluation=EvalSettings(**ev),
                heldout_frac=float(data.get("heldout_frac", 0.05)),
                diagnosis=DiagnosisSettings.from_dict(diag) if diag is not None else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"malformed surgery job ({exc}): the file is damaged or from another version") from exc


def measure(loaded, prompts_ids: list[list[int]], eval_blocks: torch.Tensor, settings: EvalSettings, *,
            prompts: list[str], seed: int) -> dict[str, Any]:
    """The model-level numbers compared before and after surgery. MLP dormancy twice: `mlp_dormancy` by
    activation (share of units per layer), `mlp_weight_dormancy` by weight norms (units per layer, the paper's)."""
    from .evaluate import mlp_activation_dormancy, mlp_weight_dormancy

    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return {
        "heldout_ppl": perplexity(mean_loss(loaded.model, eval_blocks, settings.batch_size)),
        "prompt_ppl": perplexity(prompt_loss(loaded.model, prompts_ids, pad, settings.batch_size)),
        "mlp_dormancy": mlp_activation_dormancy(loaded.model, loaded.adapter, prompts_ids, pad,
                                                settings.dormancy_threshold, settings.batch_size),
        "mlp_weight_dormancy": mlp_weight_dormancy(loaded.model, loaded.adapter, settings.weight_dormancy_threshold),
        "completions": completions(loaded.model, tok, prompts, settings, seed) if settings.completion_prompts else [],
    }


def before_point(before: HeadReport, heldout_ppl: float, targets: list[tuple[int, int]]) -> EvalMetrics:
    """The model before the operation as the first evaluation point (what `[` scrubs back to)."""
    grids = {k: getattr(before, k).round(5).tolist() for k in ("bos_mass", "contribution", "entropy", "local_mass")}
    per_head = {f"{l}.{h}": {k: float(getattr(before, k)[l, h]) for k in grids} for l, h in targets}
    return EvalMetrics(0, math.nan, math.nan, heldout_ppl, per_head, label="before", **grids)


def run_job(loaded, job: SurgeryJob, out_dir: str | Path, *, sink: Sink | None = None,
            cancelled: Callable[[], bool] = lambda: False, baseline: HeadReport | None = None,
            corpus: PackedCorpus | None = None, resume: bool = False) -> dict[str, Any]:
    """Run every pass of `job` on `loaded` (modified in place: afterwards it is base + patch), write the
    patch and report into `out_dir`, and return the report. `resume` continues from checkpoints there.
    `baseline`, when given, must be a diagnosis of `loaded` with `job.diagnosis`."""
    sink = sink or NullSink()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings, tconf, dsettings = job.evaluation, job.train, job.diagnosis
    for plan in job.plans:
        plan.check_fits(loaded.adapter)
    identity = model_identity(loaded)
    prompts = load_prompts(dsettings.prompts)
    sink.emit(PhaseChanged("corpus", f"loading {job.corpus.describe()} in blocks of {tconf.seq_len}"))
    corpus = corpus or load_corpus(job.corpus, loaded.tokenizer, tconf.seq_len, job.heldout_frac)
    prompt_ids = tokenize_prompts(loaded.tokenizer, prompts, dsettings.max_len)
    eval_blocks = corpus.heldout[: tconf.eval_blocks]

    sink.emit(PhaseChanged("baseline", "measuring the model before surgery"))
    before = baseline if baseline is not None else diagnose(loaded, prompts, dsettings, cancelled=cancelled)
    if cancelled():  # a cut-short diagnosis is no "before": stop before recording anything
        sink.emit(RunFinished(0, -1, math.inf, cancelled=True))
        return {"cancelled": True, "passes": [], "run_dir": str(out)}
    before = before.with_thresholds(dsettings.thresholds)
    measured_before = measure(loaded, prompt_ids, eval_blocks, settings, prompts=prompts, seed=tconf.seed)
    sink.emit(before_point(before, measured_before["heldout_ppl"], job.targets))

    meta = {"base_model": identity, "job": job.to_dict()}
    passes: list[PassResult] = []
    tensors: dict[str, torch.Tensor] = {}
    for i, plan in enumerate(job.plans):
        name = f"pass-{i + 1}"
        pass_dir = out / "checkpoints" / name
        if resume and (pass_dir / DONE_FILE).is_file():
            done = json.loads((pass_dir / DONE_FILE).read_text())
            best, _ = load_patch(done["best_checkpoint"])
            apply_head_tensors(loaded.model, loaded.adapter, best)
            tensors.update(best)
            passes.append(PassResult(plan, done["history"], done["best_step"], done["best_heldout_ppl"] or math.inf,
                                     done["best_checkpoint"], done["steps_done"], done["cancelled"]))
            sink.emit(PhaseChanged(name, f"already done (best step {done['best_step']}), kept"))
            continue
        run = SurgeryRun(loaded, plan, corpus, tconf, prompt_ids=prompt_ids, out_dir=out, meta=meta,
                         eval_settings=settings, diagnosis_batch=dsettings.batch_size, sink=sink,
                         cancelled=cancelled, pass_name=name)
        state = pass_dir / STATE_FILE
        if resume and not state.is_file():  # this pass starts over: what it logged before is superseded
            sink.emit(Resumed(name, 0))
        result = run.run(resume_state=state if resume and state.is_file() else None)
        passes.append(result)
        if result.cancelled:  # no done marker and no after-evaluation: `resume` continues this pass
            sink.emit(RunFinished(result.steps_done, result.best_step, result.best_heldout_ppl, cancelled=True))
            return {"cancelled": True, "passes": [p.to_dict() for p in passes], "run_dir": str(out)}
        tensors.update(run.finish().head_tensors())
        atomic_write_text(pass_dir / DONE_FILE, json.dumps(result.to_dict(), indent=1))

    sink.emit(PhaseChanged("evaluate", "measuring the repaired model"))
    targets = job.targets
    patch_path = out / PATCH_FILE
    save_patch(patch_path, tensors, {**meta, "heads": format_heads(parse_tensor_name(k)[:2] for k in tensors)})
    after = diagnose(loaded, prompts, dsettings)
    ablation = corpus.heldout[: max(settings.ablation_blocks, 1)]
    deltas = ablation_deltas(loaded.model, loaded.adapter, targets, ablation, settings.batch_size)
    measured_after = measure(loaded, prompt_ids, eval_blocks, settings, prompts=prompts, seed=tconf.seed)
    report = {
        "schema_version": OPERATION_SCHEMA_VERSION,
        "base_model": identity,
        "job": job.to_dict(),
        "corpus": {"description": corpus.description, "train_blocks": len(corpus.train),
                   "heldout_blocks": len(corpus.heldout), "seq_len": corpus.seq_len},
        "device": str(loaded.device), "dtype": str(loaded.dtype).replace("torch.", ""),
        "patch": PATCH_FILE,
        "passes": [p.to_dict() for p in passes],
        "history": [pt for p in passes for pt in p.history],
        "cancelled": False,
        "recovery": recovery(after, targets, deltas, settings, before),
        "iatrogenic": iatrogenic(before, after, targets),
        "drift": drift(before, after, targets, job.frozen, settings.drift_threshold),
        "ppl": {"heldout_before": measured_before["heldout_ppl"], "heldout_after": measured_after["heldout_ppl"],
                "prompts_before": measured_before["prompt_ppl"], "prompts_after": measured_after["prompt_ppl"]},
        "mlp_dormancy": {"before": measured_before["mlp_dormancy"], "after": measured_after["mlp_dormancy"]},
        "completions": {"before": measured_before["completions"], "after": measured_after["completions"]},
        "diagnosis_before": before.to_json(),
        "diagnosis_after": after.to_json(),
    }
    report = json_safe(report)
    atomic_write_text(out / REPORT_FILE, json.dumps(report, indent=1, allow_nan=False))
    last = passes[-1] if passes else None
    sink.emit(RunFinished(last.steps_done if last else 0, last.best_step if last else -1,
                          last.best_heldout_ppl if last else math.inf))
    return report
