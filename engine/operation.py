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
from .distributed import any_rank, broadcast, world
from .errors import InputError
from .evaluate import (EvalSettings, ablation_deltas, completions, drift, iatrogenic, mean_loss,
                       mlp_activation_dormancy, mlp_weight_dormancy, perplexity, prompt_loss, recovery)
from .events import EvalMetrics, Notice, NullSink, PhaseChanged, Resumed, RunFailed, RunFinished, Sink, json_safe
from .function import add_targets, function_baseline, working_notice
from .fastpath import fast_kernels
from .runview import CONTROL_PREFIX
from .model import model_identity
from .patch import apply_head_tensors, load_patch, parse_tensor_name, save_patch
from .prompts import load_prompts
from .spec import format_heads
from .recipe import differences
from .report import HeadReport, Thresholds
from .surgery import SurgeryPlan, read_head_tensors, sham
from .tracked import TrackedSet, tracked_set
from .train import STATE_FILE, PassResult, SurgeryRun, TrainConfig, TrainingDiverged

REPORT_FILE = "report.json"
PATCH_FILE = "patch.safetensors"
CONTROL_PATCH_FILE = "control.safetensors"
OPERATION_SCHEMA_VERSION = 1
DONE_FILE = "done.json"


def plan_targets(plans: list[SurgeryPlan]) -> list[tuple[int, int]]:
    return sorted({t for p in plans for t in p.targets})


def plan_frozen(plans: list[SurgeryPlan]) -> list[tuple[int, int]]:
    """Heads some plan keeps frozen and none operates on."""
    return sorted({f for p in plans for f in p.frozen} - set(plan_targets(plans)))


@dataclass
class SurgeryJob:
    """Everything that defines a surgery run, as recorded in sessions and patches."""

    plans: list[SurgeryPlan]
    corpus: CorpusSpec
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    heldout_frac: float = 0.05
    diagnosis: DiagnosisSettings | None = None  # None: defaults with the evaluation's thresholds
    control: str | None = None  # "sham": the same plans again from the base, without re-init or zeroing
    # a last pass whose specs name heads by class or statistic: resolved against a diagnosis of the model the
    # passes before it leave (their best checkpoints), as the paper built its pass 2. Keys as SurgeryPlan.to_dict.
    deferred: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.plans:
            raise InputError("a surgery job needs at least one plan")
        if self.control not in (None, "sham"):
            raise InputError(f"unknown control arm {self.control!r}: the control arm is sham")
        if any(p.init == "none" for p in self.plans):
            raise InputError("a plan with init 'none' is a sham: ask for it with the control arm (--control sham)")
        if self.deferred is not None:
            from .spec import check_syntax

            for field_name in ("targets", "frozen"):
                if self.deferred.get(field_name):
                    check_syntax(self.deferred[field_name])
        if self.diagnosis is None:
            self.diagnosis = DiagnosisSettings(thresholds=self.evaluation.thresholds)
        self.evaluation.thresholds = self.diagnosis.thresholds  # one set of class boundaries for the whole job

    @property
    def targets(self) -> list[tuple[int, int]]:
        return plan_targets(self.plans)

    @property
    def frozen(self) -> list[tuple[int, int]]:
        return plan_frozen(self.plans)

    def to_dict(self) -> dict[str, Any]:
        ev = asdict(self.evaluation)
        return {"plans": [p.to_dict() for p in self.plans], "corpus": asdict(self.corpus), "train": asdict(self.train),
                "evaluation": ev, "heldout_frac": self.heldout_frac, "diagnosis": self.diagnosis.to_dict(),
                "control": self.control, "deferred": self.deferred}

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
                control=data.get("control"),
                deferred=data.get("deferred"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"malformed surgery job ({exc}): the file is damaged or from another version") from exc


def measure(loaded, prompts_ids: list[list[int]], eval_blocks: torch.Tensor, settings: EvalSettings, *,
            prompts: list[str], seed: int, fast: bool = True, tracked: TrackedSet | None = None) -> dict[str, Any]:
    """The model-level numbers compared before and after surgery. Perplexities go through the same kernels
    as the evaluation points during training (`fast`: SDPA attention, fused GeLU), so in bf16 the before,
    every point and the after are one measurement. MLP dormancy twice: `mlp_dormancy` by activation (share
    of units per layer), `mlp_weight_dormancy` by weight norms (units per layer, the paper's)."""
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with fast_kernels(loaded.model, loaded.adapter, fast):
        heldout = perplexity(mean_loss(loaded.model, eval_blocks, settings.batch_size))
        prompt = perplexity(prompt_loss(loaded.model, prompts_ids, pad, settings.batch_size))
        track = perplexity(tracked.loss(loaded.model, settings.batch_size)) if tracked is not None else None
    return {
        "heldout_ppl": heldout,
        "prompt_ppl": prompt,
        "tracked_ppl": track,
        "mlp_dormancy": mlp_activation_dormancy(loaded.model, loaded.adapter, prompts_ids, pad,
                                                settings.dormancy_threshold, settings.batch_size),
        "mlp_weight_dormancy": mlp_weight_dormancy(loaded.model, loaded.adapter, settings.weight_dormancy_threshold),
        "completions": completions(loaded.model, tok, prompts, settings, seed, loaded.adapter.max_len)
        if settings.completion_prompts else [],
    }


def before_point(before: HeadReport, heldout_ppl: float, targets: list[tuple[int, int]]) -> EvalMetrics:
    """The model before the operation as the first evaluation point (what `[` scrubs back to)."""
    grids = {k: getattr(before, k).round(5).tolist() for k in ("bos_mass", "contribution", "entropy", "local_mass")}
    per_head = {f"{l}.{h}": {k: float(getattr(before, k)[l, h]) for k in grids} for l, h in targets}
    return EvalMetrics(0, math.nan, math.nan, heldout_ppl, per_head, label="before", **grids)


@dataclass
class _Arm:
    """One arm's passes and the slices they leave (the surgery, or its sham control)."""

    passes: list[PassResult]
    tensors: dict[str, torch.Tensor]
    cancelled: bool = False


class _Job:
    """The state one `run_job` call shares between its phases."""

    def __init__(self, loaded, job: SurgeryJob, out: Path, sink: Sink, cancelled: Callable[[], bool], resume: bool):
        self.loaded, self.job, self.out, self.sink, self.cancelled, self.resume = loaded, job, out, sink, cancelled, resume
        self.prompts = load_prompts(job.diagnosis.prompts)
        self.prompt_ids = tokenize_prompts(loaded.tokenizer, self.prompts, job.diagnosis.max_len)
        self.identity = broadcast(model_identity(loaded) if world().main else None)  # rank 0 hashes the weights
        self.meta = {"base_model": self.identity, "job": job.to_dict()}
        self.corpus: PackedCorpus | None = None
        self.tracked: TrackedSet | None = None
        self.function: dict[str, Any] | None = None
        self.plans = list(job.plans)  # resolved so far (a deferred last pass joins once resolved)

    @property
    def targets(self) -> list[tuple[int, int]]:
        return plan_targets(self.plans)

    @property
    def frozen(self) -> list[tuple[int, int]]:
        return plan_frozen(self.plans)

    @property
    def eval_blocks(self) -> torch.Tensor:
        return self.corpus.heldout[: self.job.train.eval_blocks]

    @property
    def ablation_blocks(self) -> torch.Tensor:
        return self.corpus.heldout[: max(self.job.evaluation.ablation_blocks, 1)]

    @property
    def fast(self) -> bool:
        """The kernels the training loop evaluates with: every loss of the job goes through the same ones."""
        return self.job.train.attention == "sdpa"

    def measure(self) -> dict[str, Any]:
        return measure(self.loaded, self.prompt_ids, self.eval_blocks, self.job.evaluation, prompts=self.prompts,
                       seed=self.job.train.seed, fast=self.fast, tracked=self.tracked)

    def run_passes(self, plans: list[SurgeryPlan], prefix: str, first: int = 1) -> _Arm:
        """Every pass of one arm, each from the previous one's best checkpoint; passes a resumed run
        already finished are taken from their checkpoints."""
        loaded, arm = self.loaded, _Arm([], {})
        for i, plan in enumerate(plans, start=first):
            name = f"{prefix}-{i}"
            pass_dir = self.out / "checkpoints" / name
            if self.resume and (pass_dir / DONE_FILE).is_file():
                done = json.loads((pass_dir / DONE_FILE).read_text())
                best, _ = load_patch(done["best_checkpoint"])
                apply_head_tensors(loaded.model, loaded.adapter, best)
                arm.tensors.update(best)
                arm.passes.append(PassResult(plan, done["history"], done["best_step"],
                                             done["best_heldout_ppl"] or math.inf, done["best_checkpoint"],
                                             done["steps_done"], done["cancelled"],
                                             selected_on=done.get("selected_on", "heldout"),
                                             best_score=done.get("best_selection_ppl") or math.inf,
                                             stopped_early=done.get("stopped_early", False)))
                self.sink.emit(PhaseChanged(name, f"already done (best step {done['best_step']}), kept"))
                continue
            run = SurgeryRun(loaded, plan, self.corpus, self.job.train, prompt_ids=self.prompt_ids, out_dir=self.out,
                             meta=self.meta, eval_settings=self.job.evaluation,
                             diagnosis_batch=self.job.diagnosis.batch_size, function=self.function,
                             tracked=self.tracked, sink=self.sink, cancelled=self.cancelled, pass_name=name)
            state = pass_dir / STATE_FILE
            if self.resume and not state.is_file():  # this pass starts over: what it logged before is superseded
                self.sink.emit(Resumed(name, 0))
            result = run.run(resume_state=state if self.resume and state.is_file() else None)
            arm.passes.append(result)
            if result.cancelled:  # no done marker and no after-evaluation: `resume` continues this pass
                arm.cancelled = True
                return arm
            arm.tensors.update(run.finish().head_tensors())
            atomic_write_text(pass_dir / DONE_FILE, json.dumps(result.to_dict(), indent=1))
        return arm

    def judge(self, arm: _Arm, before: HeadReport, patch_file: str) -> dict[str, Any]:
        """Save the arm's patch and measure the model it leaves (the model holds base + that patch)."""
        loaded, job, targets = self.loaded, self.job, self.targets
        save_patch(self.out / patch_file, arm.tensors,
                   {**self.meta, "heads": format_heads(parse_tensor_name(k)[:2] for k in arm.tensors)})
        after = diagnose(loaded, self.prompts, job.diagnosis)
        with fast_kernels(loaded.model, loaded.adapter, self.fast):
            deltas = ablation_deltas(loaded.model, loaded.adapter, targets, self.ablation_blocks,
                                     job.evaluation.batch_size)
        counts = lambda r: {"classes": r.counts(), "paper": r.paper_counts()}  # noqa: E731
        class_counts = {"before": counts(before), **{f"pass-{i}": p.class_counts() for i, p in
                                                     enumerate(arm.passes, start=1)}, "after": counts(after)}
        return {"patch": patch_file, "after": after, "measured": self.measure(), "class_counts": class_counts,
                "passes": [p.to_dict() for p in arm.passes], "history": [pt for p in arm.passes for pt in p.history],
                "recovery": recovery(after, targets, deltas, job.evaluation, before, self.function),
                "iatrogenic": iatrogenic(before, after, targets),
                "drift": drift(before, after, targets, self.frozen, job.evaluation.drift_threshold)}

    def resolve_deferred(self, before: HeadReport, base_slices: dict[str, torch.Tensor]) -> SurgeryPlan | None:
        """The deferred pass's plan, resolved against a diagnosis of the model as the passes so far left it;
        its new targets' function is measured on the base, like the others'. None when it names no head."""
        loaded, job, spec = self.loaded, self.job, self.job.deferred
        name = f"pass-{len(self.plans) + 1}"
        self.sink.emit(PhaseChanged(name, f"diagnosing the model pass {len(self.plans)} left, to resolve "
                                          f"{spec['targets']!r}"))
        now = diagnose(loaded, self.prompts, job.diagnosis)
        try:
            plan = SurgeryPlan.from_dict(spec, loaded.adapter, report=now)
        except InputError as exc:
            if "no target heads" not in str(exc):
                raise
            self.sink.emit(Notice(f"{name}: {spec['targets']!r} names no head once pass {len(self.plans)} is done; "
                                  "skipped"))
            return None
        self.sink.emit(PhaseChanged(name, f"{spec['targets']!r} is {format_heads(plan.targets)} after pass "
                                          f"{len(self.plans)}"))
        fresh = [t for t in plan.targets if t not in self.targets]
        base_slices.update(read_head_tensors(loaded.model, loaded.adapter, fresh))  # still the base's values
        passed = read_head_tensors(loaded.model, loaded.adapter, self.targets)
        apply_head_tensors(loaded.model, loaded.adapter, base_slices)  # their function is measured on the base
        with fast_kernels(loaded.model, loaded.adapter, self.fast):
            working = add_targets(self.function, loaded, before, fresh, self.ablation_blocks, job.evaluation)
        apply_head_tensors(loaded.model, loaded.adapter, passed)
        notice = working_notice(working, len(fresh))
        if notice:
            self.sink.emit(Notice(notice))
        self.plans.append(plan)
        return plan


def _ppl(measured_before: dict[str, Any], measured_after: dict[str, Any]) -> dict[str, float]:
    return {"heldout_before": measured_before["heldout_ppl"], "heldout_after": measured_after["heldout_ppl"],
            "prompts_before": measured_before["prompt_ppl"], "prompts_after": measured_after["prompt_ppl"],
            "tracked_before": measured_before["tracked_ppl"], "tracked_after": measured_after["tracked_ppl"]}


def _last_ppl(passes: list[dict[str, Any]]) -> float:
    """Held-out perplexity at the last evaluation point of the last pass (where training ended)."""
    points = [p for p in (passes[-1]["history"] if passes else []) if p["heldout_ppl"] is not None]
    return points[-1]["heldout_ppl"] if points else math.nan


def verdict(surgery: dict[str, Any], control: dict[str, Any], tolerance: float = 0.005) -> dict[str, Any]:
    """Held-out perplexity of the surgery against its sham control: of the checkpoint each arm keeps (its
    lowest selection perplexity: these same held-out blocks, or the tracked set with select_on tracked) and at
    its last evaluation point; within `tolerance` (relative) they tie."""
    def lower(a: float, b: float) -> str:
        if not (math.isfinite(a) and math.isfinite(b)) or abs(a - b) <= tolerance * min(a, b):
            return "tie"
        return "surgery" if a < b else "control"

    kept = {"surgery": surgery["ppl"]["heldout_after"], "control": control["ppl"]["heldout_after"]}
    last = {"surgery": _last_ppl(surgery["passes"]), "control": _last_ppl(control["passes"])}
    out = {"heldout_ppl_kept": kept, "heldout_ppl_last": last, "tolerance": tolerance,
           "lower_kept": lower(kept["surgery"], kept["control"]), "lower_last": lower(last["surgery"], last["control"])}
    who = {"tie": f"a tie (within {100 * tolerance:g}%)", "surgery": "the surgery lower", "control": "the control lower"}
    out["text"] = (f"held-out ppl {surgery['ppl']['heldout_before']:.2f} -> kept checkpoints: surgery "
                   f"{kept['surgery']:.2f}, sham control {kept['control']:.2f} ({who[out['lower_kept']]}); last points "
                   f"{last['surgery']:.2f} vs {last['control']:.2f} ({who[out['lower_last']]})")
    return out


def run_job(loaded, job: SurgeryJob, out_dir: str | Path, *, sink: Sink | None = None,
            cancelled: Callable[[], bool] = lambda: False, baseline: HeadReport | None = None,
            corpus: PackedCorpus | None = None, resume: bool = False) -> dict[str, Any]:
    """Run every pass of `job` on `loaded` (modified in place: afterwards it is base + patch), write the
    patch and report into `out_dir`, and return the report. `resume` continues from checkpoints there.
    `baseline`, when given, must be a diagnosis of `loaded` with `job.diagnosis`. With `job.control` the
    same plans then run again from the base as a sham (no re-init, no zeroing) for comparison."""
    sink = sink or NullSink()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for plan in job.plans:
        plan.check_fits(loaded.adapter)
    ctx = _Job(loaded, job, out, sink, cancelled, resume)
    tconf, dsettings = job.train, job.diagnosis
    loaded.adapter.check_length(tconf.seq_len, "seq len")
    loaded.adapter.check_length(dsettings.max_len, "diagnosis max length")
    sink.emit(PhaseChanged("corpus", f"loading {job.corpus.describe()} in blocks of {tconf.seq_len}"))
    ctx.corpus = corpus or load_corpus(job.corpus, loaded.tokenizer, tconf.seq_len, job.heldout_frac)
    ctx.tracked = tracked_set(ctx.corpus, loaded.tokenizer, blocks=tconf.track_blocks, texts=tconf.track_texts,
                              max_len=tconf.seq_len)

    sink.emit(PhaseChanged("baseline", "measuring the model before surgery"))
    before = baseline if baseline is not None else diagnose(loaded, ctx.prompts, dsettings, cancelled=cancelled)
    if any_rank(cancelled()):  # a cut-short diagnosis is no "before": stop before recording anything
        sink.emit(RunFinished(0, -1, math.inf, cancelled=True))
        return {"cancelled": True, "passes": [], "run_dir": str(out)}
    before = before.with_thresholds(dsettings.thresholds)
    measured_before = ctx.measure()
    with fast_kernels(loaded.model, loaded.adapter, ctx.fast):
        ctx.function = function_baseline(loaded, before, ctx.targets, ctx.ablation_blocks, job.evaluation,
                                         tconf.seed)
    sink.emit(before_point(before, measured_before["heldout_ppl"], ctx.targets))
    notice = working_notice(ctx.function["working"], len(ctx.targets))
    if notice:
        sink.emit(Notice(notice))
    base_slices = read_head_tensors(loaded.model, loaded.adapter, ctx.targets)

    arm = ctx.run_passes(job.plans, "pass")
    if arm.cancelled:
        return _cancelled(sink, arm, out)
    if job.deferred:
        plan = ctx.resolve_deferred(before, base_slices)
        if plan is not None:
            last = ctx.run_passes([plan], "pass", first=len(ctx.plans))
            arm.passes += last.passes
            arm.tensors.update(last.tensors)
            if last.cancelled:
                return _cancelled(sink, arm, out)
    sink.emit(PhaseChanged("evaluate", "measuring the repaired model"))
    surgery = ctx.judge(arm, before, PATCH_FILE)
    surgery["ppl"] = _ppl(measured_before, surgery["measured"])
    control = None
    if job.control:
        apply_head_tensors(loaded.model, loaded.adapter, base_slices)  # the control starts from the base too
        ctx.sink = _ControlSink(sink)
        try:  # the surgery's resolved plans, as a sham
            sham_arm = ctx.run_passes([sham(p) for p in ctx.plans], f"{CONTROL_PREFIX}pass")
        except TrainingDiverged as exc:  # the surgery stands; the report says the control has no verdict
            sham_arm, control = None, {"failed": str(exc)}
        finally:
            ctx.sink = sink
        if sham_arm is not None:
            if sham_arm.cancelled:
                return _cancelled(sink, sham_arm, out)
            sink.emit(PhaseChanged("evaluate", "measuring the sham control"))
            control = ctx.judge(sham_arm, before, CONTROL_PATCH_FILE)
            control["ppl"] = _ppl(measured_before, control["measured"])
        apply_head_tensors(loaded.model, loaded.adapter, arm.tensors)  # leave the model as base + the surgery
    report = {
        "schema_version": OPERATION_SCHEMA_VERSION,
        "base_model": ctx.identity,
        "job": job.to_dict(),
        "corpus": {"description": ctx.corpus.description, "train_blocks": len(ctx.corpus.train),
                   "heldout_blocks": len(ctx.corpus.heldout), "seq_len": ctx.corpus.seq_len},
        "device": str(loaded.device), "dtype": str(loaded.dtype).replace("torch.", ""), **world().record(),
        "recipe": {"name": tconf.recipe, "differs_from_default": differences(tconf.recipe)},
        "tracked_set": ctx.tracked.description if ctx.tracked is not None else None,
        **_arm_fields(surgery),
        "cancelled": False,
        "function_before": ctx.function,
        "mlp_dormancy": {"before": measured_before["mlp_dormancy"], "after": surgery["measured"]["mlp_dormancy"]},
        "mlp_weight_dormancy": {"before": measured_before["mlp_weight_dormancy"],
                                "after": surgery["measured"]["mlp_weight_dormancy"]},
        "completions": {"before": measured_before["completions"], "after": surgery["measured"]["completions"]},
        "diagnosis_before": before.to_json(),
    }
    if control is not None and "failed" in control:
        report["control"] = {"arm": job.control, "failed": control["failed"]}
        report["verdict"] = {"text": f"no verdict: the sham control failed ({control['failed']})"}
    elif control is not None:
        report["control"] = {"arm": job.control, **_arm_fields(control)}
        report["verdict"] = verdict(surgery, control, job.evaluation.verdict_tolerance)
    report = json_safe(report)
    atomic_write_text(out / REPORT_FILE, json.dumps(report, indent=1, allow_nan=False))
    last = arm.passes[-1] if arm.passes else None
    sink.emit(RunFinished(last.steps_done if last else 0, last.best_step if last else -1,
                          last.best_heldout_ppl if last else math.inf))
    return report


def _arm_fields(arm: dict[str, Any]) -> dict[str, Any]:
    """The report's fields for one arm (the surgery's at the top level, the control's under `control`)."""
    return {"patch": arm["patch"], "passes": arm["passes"], "history": arm["history"], "recovery": arm["recovery"],
            "iatrogenic": arm["iatrogenic"], "drift": arm["drift"], "ppl": arm["ppl"],
            "class_counts": arm["class_counts"], "diagnosis_after": arm["after"].to_json()}


class _ControlSink:
    """The control arm's events, except that its failure is a notice: the run (the surgery) goes on."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def emit(self, event) -> None:
        if isinstance(event, RunFailed):
            event = Notice(f"the sham control failed at step {event.step}: {event.message}")
        self.sink.emit(event)


def _cancelled(sink: Sink, arm: _Arm, out: Path) -> dict[str, Any]:
    last = arm.passes[-1]
    sink.emit(RunFinished(last.steps_done, last.best_step, last.best_heldout_ppl, cancelled=True))
    return {"cancelled": True, "passes": [p.to_dict() for p in arm.passes], "run_dir": str(out)}
