"""Controls and honest verdicts: the sham arm and function judged against the model's healthy heads."""

from __future__ import annotations

import pytest
import torch
from conftest import PLANTED

from engine.events import EvalMetrics, ListSink, Notice, PhaseChanged
from engine.model import load_model
from engine.operation import CONTROL_PATCH_FILE, PATCH_FILE, SurgeryJob, run_job
from engine.patch import apply_head_tensors, load_patch
from engine.prompts import builtin_prompts
from engine.spec import format_heads
from engine.workflow import JobInputs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n\n".join(builtin_prompts() * 4))
    return path


def _untouched(model, adapter, heads) -> dict[str, torch.Tensor]:
    """Every parameter with the heads' Q/K/V rows and dense columns blanked out (what must not change)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for l, h in heads:
        for name, index in ((f"transformer.h.{l}.self_attention.query_key_value.weight", (adapter.qkv_rows(h),)),
                            (f"transformer.h.{l}.self_attention.query_key_value.bias", (adapter.qkv_rows(h),)),
                            (f"transformer.h.{l}.self_attention.dense.weight", (slice(None), adapter.dense_cols(h)))):
            state[name][index] = 0
    return state


def test_the_sham_arm_starts_at_the_base_model_and_changes_only_the_targets(planted_dir, corpus, tmp_path):
    loaded = load_model(str(planted_dir), device="cpu")
    job = JobInputs(targets="0.3,2.1", corpus=str(corpus), steps=2, eval_every=1, seq_len=32, grad_accum=2, lr=1e-2,
                    completions=0, eval_blocks=4, control="sham").build_job(loaded.adapter)
    job.evaluation.ablation_blocks = 2
    sink = ListSink()
    report = run_job(loaded, job, tmp_path, sink=sink)

    control = report["control"]
    assert control["arm"] == "sham" and control["patch"] == CONTROL_PATCH_FILE
    base_ppl = report["ppl"]["heldout_before"]
    assert control["history"][0]["step"] == 0 and control["history"][0]["heldout_ppl"] == pytest.approx(base_ppl, rel=1e-6)
    assert report["history"][0]["heldout_ppl"] != base_ppl  # the re-init changed the model
    assert [p["step"] for p in control["history"]] == [p["step"] for p in report["history"]] == [0, 1, 2]
    assert control["recovery"]["targets"] == 2 and "drift" in control and "diagnosis_after" in control
    v = report["verdict"]
    assert set(v["heldout_ppl_kept"]) == {"surgery", "control"} and v["lower_kept"] in ("surgery", "control", "tie")
    assert v["heldout_ppl_last"]["control"] == control["history"][-1]["heldout_ppl"]
    assert "sham control" in v["text"]
    labels = {e.label for e in sink.of(EvalMetrics)}
    assert {"before", "pass-1", "control-pass-1"} <= labels

    base = load_model(str(planted_dir), device="cpu")
    expected = _untouched(base.model, base.adapter, PLANTED)
    for patch_file in (PATCH_FILE, CONTROL_PATCH_FILE):  # each arm changes the targets' slices and nothing else
        arm = load_model(str(planted_dir), device="cpu")
        apply_head_tensors(arm.model, arm.adapter, load_patch(tmp_path / patch_file)[0])
        got = _untouched(arm.model, arm.adapter, PLANTED)
        assert all(torch.equal(got[k], expected[k]) for k in expected), patch_file
    # The model the job leaves behind is base + the surgery (what --export writes), not the control.
    surgery = load_model(str(planted_dir), device="cpu")
    apply_head_tensors(surgery.model, surgery.adapter, load_patch(tmp_path / PATCH_FILE)[0])
    for (name, a), b in zip(surgery.model.state_dict().items(), loaded.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_the_control_arm_is_part_of_the_job_and_survives_a_round_trip(planted_dir, corpus):
    loaded = load_model(str(planted_dir), device="cpu")
    job = JobInputs(targets="0.3", corpus=str(corpus), control="sham").build_job(loaded.adapter)
    again = SurgeryJob.from_dict(job.to_dict(), loaded.adapter)
    assert again.control == "sham" and again.to_dict() == job.to_dict()
    assert JobInputs.from_job(job.to_dict()).control == "sham"


def test_function_is_judged_against_healthy_heads_and_a_reinitialised_head_has_none(tmp_path):
    """On the bundled organism: L0.H0 (a healthy local head) does measurable work before; re-initialised
    and trained for nothing (lr 0) it does none, and the report says it lost function."""
    loaded = load_model(None, device="cpu")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(builtin_prompts()[:4]))
    job = JobInputs(targets="0.0", corpus="python-stdlib/json", steps=1, eval_every=1, seq_len=64, grad_accum=1,
                    lr=0.0, completions=0, eval_blocks=2, prompts=str(prompts), max_len=64).build_job(loaded.adapter)
    job.evaluation.ablation_blocks = 2
    sink = ListSink()
    report = run_job(loaded, job, tmp_path / "run", sink=sink)
    function = report["function_before"]
    ref = function["reference"]
    assert len(ref["heads"]) == 16 and "0.0" not in ref["heads"] and ref["median_ablation_delta"] > 0
    assert ref["threshold"] == pytest.approx(0.25 * ref["median_ablation_delta"])
    assert function["targets"]["0.0"]["functional"] and function["working"] == ["0.0"]
    rec = report["recovery"]
    head = rec["per_head"]["0.0"]
    assert head["functional_before"] and not head["functional"] and head["lost_function"]
    assert abs(head["ablation_delta"]) < 1e-6  # its output columns are zero: ablating it changes nothing
    assert rec["lost_function"] == ["0.0"] and rec["functional"] == 0
    notices = sink.of(Notice)
    assert len(notices) == 1 and "doing measurable work" in notices[0].message and "0.0" in notices[0].message


def test_a_second_pass_named_by_class_resolves_against_the_first_pass_best_model(planted_dir, corpus, tmp_path):
    """Pass 1 re-initialises L0.H3; pass 2 is `sick`. Against the stock model that would be both planted
    heads again; against the model pass 1 left it is L2.H1 alone."""
    loaded = load_model(str(planted_dir), device="cpu")
    inputs = JobInputs(targets="0.3", pass2_targets="sick", corpus=str(corpus), steps=2, eval_every=1, seq_len=32,
                       grad_accum=2, lr=1e-2, completions=0, eval_blocks=4)
    job = inputs.build_job(loaded.adapter)
    assert [format_heads(p.targets) for p in job.plans] == ["0.3"] and job.deferred["targets"] == "sick"
    assert not inputs.needs_diagnosis()  # only the first pass needs one before the run
    job.evaluation.ablation_blocks = 2
    sink = ListSink()
    report = run_job(loaded, job, tmp_path, sink=sink)
    assert [p["plan"]["targets"] for p in report["passes"]] == ["0.3", "2.1"]
    assert report["recovery"]["targets"] == 2 and set(report["function_before"]["targets"]) == {"0.3", "2.1"}
    assert report["job"]["deferred"]["targets"] == "sick"  # the job keeps what was asked
    assert any("'sick' is 2.1 after pass 1" in e.detail for e in sink.of(PhaseChanged))


def test_the_verdict_on_fixed_numbers():
    from engine.operation import verdict

    def arm(before, kept, last):
        return {"ppl": {"heldout_before": before, "heldout_after": kept},
                "passes": [{"history": [{"step": 0, "heldout_ppl": 99.0}, {"step": 5, "heldout_ppl": last}]}]}

    v = verdict(arm(9.5, 11.1, 11.3), arm(9.5, 9.2, 9.3))
    assert v["lower_kept"] == v["lower_last"] == "control" and v["heldout_ppl_last"] == {"surgery": 11.3, "control": 9.3}
    assert verdict(arm(9.5, 9.20, 9.3), arm(9.5, 9.21, 9.3))["lower_kept"] == "tie"  # within 0.5%
    assert verdict(arm(9.5, 9.0, 9.3), arm(9.5, 9.2, 9.3), tolerance=0.001)["lower_kept"] == "surgery"
    assert verdict(arm(9.5, float("nan"), 9.3), arm(9.5, 9.2, 9.3))["lower_kept"] == "tie"


def test_a_diverging_control_leaves_the_surgery_standing_and_says_there_is_no_verdict(planted_dir, corpus, tmp_path):
    loaded = load_model(str(planted_dir), device="cpu")
    job = JobInputs(targets="0.3", corpus=str(corpus), steps=2, eval_every=1, seq_len=32, grad_accum=2, lr=1e-2,
                    completions=0, eval_blocks=4, control="sham").build_job(loaded.adapter)
    job.evaluation.ablation_blocks = 2
    in_control = {"on": False}

    class Watch(ListSink):
        def emit(self, event):
            super().emit(event)
            if isinstance(event, PhaseChanged) and event.phase.startswith("control-"):
                in_control["on"] = True

    loaded.model.transformer.ln_f.register_forward_hook(  # NaN once the control trains
        lambda module, args, output: output * float("nan") if in_control["on"] and module.training else output)
    sink = Watch()
    report = run_job(loaded, job, tmp_path, sink=sink)
    assert report["control"]["failed"].startswith("loss became nan") and "no verdict" in report["verdict"]["text"]
    assert report["recovery"]["targets"] == 1 and (tmp_path / "report.json").is_file()
    assert not [e for e in sink.events if e.kind == "failed"]  # the run did not fail: a notice says why
    assert any("sham control failed" in e.message for e in sink.of(Notice))
