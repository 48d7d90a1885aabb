"""The digits demo's parts (data, MLP velocity folder, classifier, prompt cache, findings) and its stage runner."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO

from instaflow_pl.data.digits import DIGIT_PROMPTS, HELD_OUT, DigitsDataModule, load_digits, prompt_label
from instaflow_pl.errors import UserError
from instaflow_pl.families import FAMILIES, latent_geometry, network_from_config
from instaflow_pl.families.digits_tiny import build_digits_base
from instaflow_pl.model_folder import ModelFolder
from instaflow_pl.velocity.mlp import MLPVelocityNet

DEMO_CONFIGS = REPO / "configs" / "demo"


@pytest.fixture(scope="module")
def digits_base(tmp_path_factory):
    return build_digits_base(tmp_path_factory.mktemp("digits") / "base", width=32, num_blocks=1)


def test_digit_splits_are_disjoint_fixed_and_prompted():
    train, held = load_digits("train"), load_digits("heldout")
    assert (len(train), len(held)) == (1797 - HELD_OUT, HELD_OUT)
    assert train.images.shape[1:] == (1, 8, 8) and -1.0 <= float(train.images.min()) < float(train.images.max()) <= 1

    def rows(images):
        return {tuple(r.tolist()) for r in images.flatten(1)}

    assert not rows(train.images) & rows(held.images), "no held-out digit is also a training digit"
    assert rows(train.images) | rows(held.images) == rows(load_digits("all").images)
    assert torch.equal(load_digits("heldout").images, held.images)
    assert [prompt_label(p) for p in held.prompts[:20]] == held.labels[:20].tolist()
    assert DIGIT_PROMPTS[7] == "a handwritten digit seven"
    with pytest.raises(UserError, match="not a digit prompt"):
        prompt_label("a photo of a cat")


def test_digits_datamodule_yields_image_batches_without_noise():
    data = DigitsDataModule(batch_size=32, repeats=2, val_size=40)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch.x0 is None and batch.x1.shape == (32, 1, 8, 8) and len(batch.prompts) == 32
    train = load_digits("train")
    assert batch.prompts == [DIGIT_PROMPTS[int(train.labels[i])] for i in batch.index]
    assert len(data.train_dataloader()) == 2 * len(train) // 32
    val = list(data.val_dataloader())
    assert sum(len(b) for b in val) == 40 and torch.equal(val[0].x1, list(data.val_dataloader())[0].x1)
    with pytest.raises(UserError, match="val_size"):
        DigitsDataModule(val_size=HELD_OUT + 1)


def test_mlp_velocity_saves_loads_and_checks_its_text_shape(tmp_path):
    net = MLPVelocityNet(width=32, num_blocks=2, cross_attention_dim=8, text_tokens=4)
    net.save_pretrained(tmp_path / "unet")
    loaded = FAMILIES["digits"].network_class("MLPVelocityNet").from_pretrained(tmp_path / "unet")
    assert isinstance(loaded, MLPVelocityNet)
    x, text = torch.randn(3, 1, 8, 8), torch.randn(3, 4, 8)
    t = torch.tensor([0.0, 500.0, 1000.0])
    assert torch.equal(net(x, t, text, return_dict=False)[0], loaded(x, t, text, return_dict=False)[0])
    assert torch.equal(net(x, 500.0, text)["sample"][1], net(x, t, text)["sample"][1])  # scalar timestep
    rebuilt = network_from_config(json.loads(net.to_json_string()))
    assert isinstance(rebuilt, MLPVelocityNet) and rebuilt.config.width == 32
    geometry = latent_geometry(net)
    assert geometry.shape == (1, 8, 8) and geometry.fits((1, 8, 8)) and not geometry.fits((1, 16, 16))
    with pytest.raises(ValueError, match="text states of shape"):
        net(x, t, torch.randn(3, 77, 8))
    with pytest.raises(UserError, match="cannot load"):
        network_from_config({"_class_name": "SomethingElse"})


def test_digits_base_is_a_velocity_teacher_in_pixel_space(digits_base):
    from instaflow_pl.teachers import load_teacher

    teacher = load_teacher(digits_base, solver="euler", steps=3)
    assert teacher.kind == "velocity" and teacher.latent_shape == (1, 8, 8)
    x0 = torch.randn(2, 1, 8, 8)
    solution = teacher.sample(x0, DIGIT_PROMPTS[:2], guidance=1.5)
    assert solution.x.shape == (2, 1, 8, 8) and solution.nfe == 3
    with pytest.raises(UserError, match="exactly"):
        teacher.check_latent_shape((1, 16, 16))
    assert not (digits_base / "vae").exists()


def test_prompt_cache_gives_batch_independent_embeddings(digits_base):
    plain = ModelFolder.open(digits_base).load_encoder()
    cached = ModelFolder.open(digits_base).load_encoder(cache_mb=1)
    prompts = list(DIGIT_PROMPTS[:4]) * 2
    first = cached.encode(prompts).embeds
    assert torch.allclose(first, plain.encode(prompts).embeds, atol=1e-6)
    assert torch.equal(cached.encode(prompts[::-1]).embeds, first.flip(0))  # bitwise: no dependence on the batch
    assert torch.equal(cached.encode(prompts[:1]).embeds, first[:1])
    tiny = ModelFolder.open(digits_base).load_encoder(cache_mb=first[0].numel() * 4 * 2.5 / 2**20)  # room for two
    tiny.encode(DIGIT_PROMPTS[:5])  # a batch is always kept whole
    assert len(tiny._cache) == 5
    tiny.encode(DIGIT_PROMPTS[5:6])
    assert list(tiny._cache) == [DIGIT_PROMPTS[4], DIGIT_PROMPTS[5]]  # least recently used out


def test_classifier_learns_digits_and_round_trips(tmp_path):
    from instaflow_pl.demo.classifier import accuracy, load_classifier, save_classifier, train_classifier

    model = train_classifier(load_digits("train"), epochs=15)
    held = load_digits("heldout")
    assert accuracy(model, held) > 0.9
    save_classifier(model, tmp_path / "clf")
    again = load_classifier(tmp_path / "clf")
    assert torch.equal(again.predict(held.images), model.predict(held.images))
    with pytest.raises(UserError, match="no digit classifier"):
        load_classifier(tmp_path / "missing")


def _row(model, steps, guidance, fid, accuracy=1.0, s=None, budget=None, loss=None):
    from instaflow_pl.demo.evaluate import Row

    return Row(model, "", steps, guidance, budget, [fid, fid], [accuracy], 0.1, s, loss)


def test_findings_follow_the_numbers_both_ways():
    from instaflow_pl.demo import report

    flows = [
        _row(name, steps, w, fid, s=s)
        for name, s, one in (("1-RF", 0.08, 8.0), ("2-RF", 0.02, 5.0))
        for w in (1.0, 1.5)
        for steps, fid in ((1, one), (25, 1.4))
    ]
    assert report.finding_straightness(flows, (1.0, 1.5)).reproduced is True
    bent = [_row(r.model, r.steps, r.guidance, r.fid[0], s=0.1 if r.model == "2-RF" else r.straightness) for r in flows]
    assert report.finding_straightness(bent, (1.0, 1.5)).reproduced is False
    assert report.finding_one_step(flows, (1.0, 1.5)).reproduced is True  # 5 / 8 < 0.75
    worse = [
        _row(r.model, r.steps, r.guidance, 7.0 if r.model == "2-RF" else r.fid[0], s=r.straightness) for r in flows
    ]
    assert report.finding_one_step(worse, (1.0, 1.5)).reproduced is False  # 7 / 8 is not "well below"
    students = [
        _row("student (2-RF)", 1, 1.0, fid, accuracy=0.95, budget=b, loss=0.01) for b, fid in ((100, 3.0), (300, 2.0))
    ] + [_row("student (1-RF)", 1, 1.0, fid, budget=b, loss=0.03) for b, fid in ((100, 4.0), (300, 1.8))]
    budget = report.finding_budget(students)
    assert budget.reproduced is None and "wins at 100 budget(s) of 2" in budget.evidence
    students[3].fid = [2.5, 2.5]
    assert report.finding_budget(students).reproduced is True
    students[2].fid, students[3].fid = [2.9, 2.9], [1.5, 1.5]
    assert report.finding_budget(students).reproduced is False
    students[2].fid, students[3].fid = [4.0, 4.0], [1.8, 1.8]
    student = report.finding_student(flows, students, (1.0, 1.5))
    assert student.reproduced is True  # 95% >= 90%, 2.0 <= 1.5 x 1.4
    students[1].accuracy = [0.5]
    assert report.finding_student(flows, students, (1.0, 1.5)).verdict == "not reproduced"


def test_perflow_finding_follows_the_numbers_both_ways():
    from instaflow_pl.demo import report

    flows = [_row("2-RF", 4, w, fid, accuracy=0.99) for w, fid in ((1.0, 1.8), (1.5, 2.5))]
    perflow = [_row("PeRFlow", 4, w, fid, accuracy=0.99) for w, fid in ((1.0, 2.0), (1.5, 1.5))]
    costs = {"2-RF": 0.65, "PeRFlow": 2.0}
    seconds = {"pairs-1rf": 9.0, "2rf": 107.0, "perflow": 190.0}
    finding = report.finding_perflow(flows, perflow, costs, seconds, 4)
    assert finding.reproduced is True and finding.key == "e"  # best w: 1.5 vs 1.8
    for text in ("K=4, w=1.5) FID 1.50", "(w=1) FID 1.80", "2.00 (online", "0.65 (stored", "190 s (perflow)"):
        assert text in finding.evidence, (text, finding.evidence)
    assert "9 s (pairs-1rf) + 107 s (2rf)" in finding.evidence and "within the seed spread" not in finding.evidence
    perflow[1].accuracy = [0.97]  # lower FID but two points less accurate
    assert report.finding_perflow(flows, perflow, costs, seconds, 4).reproduced is False
    perflow[1].accuracy, perflow[1].fid = [0.99], [1.9, 1.9]
    worse = report.finding_perflow(flows, perflow, costs, {}, 4)
    assert worse.verdict == "not reproduced" and "wall time - vs -" in worse.evidence
    perflow[1].fid = [1.7, 1.88]  # mean 1.79, sd 0.13: lower, but within the spread
    assert "within the seed spread" in report.finding_perflow(flows, perflow, costs, seconds, 4).evidence


def test_a_piecewise_flow_is_evaluated_below_its_windows_on_the_uniform_grid(digits_base, tmp_path):
    import shutil

    from instaflow_pl.demo.evaluate import at_steps, load_flow
    from instaflow_pl.solver import piecewise_grid

    assert at_steps(load_flow(digits_base), 3).solver.time_grid == pytest.approx([0, 1 / 3, 2 / 3, 1])
    folder = shutil.copytree(digits_base, tmp_path / "perflow")
    info = json.loads((folder / "instaflow.json").read_text())
    (folder / "instaflow.json").write_text(json.dumps({**info, "windows": 4}))  # what an export of K = 4 records
    flow = load_flow(folder)
    assert flow.windows == 4 and flow.solver.time_grid == pytest.approx(piecewise_grid(4, 4))
    assert at_steps(flow, 6).solver.time_grid == pytest.approx(piecewise_grid(6, 4))
    assert at_steps(flow, 2).solver.time_grid == pytest.approx([0, 0.5, 1])
    assert at_steps(flow, 2).windows == 1 and flow.windows == 4  # a copy; the flow keeps its windows
    with pytest.raises(UserError, match="cannot cross 4 windows"):
        flow.with_steps(2)


TINY = {
    "1rf": ["--trainer.max_steps", "12", "--trainer.val_check_interval", "6", "--data.init_args.batch_size", "64"],
    "pairs-1rf": ["--data.init_args.repeats", "20", "--model.init_args.steps", "4"],
    "2rf": ["--trainer.max_steps", "8", "--trainer.val_check_interval", "4", "--data.init_args.batch_size", "32"],
    "pairs-2rf": ["--data.init_args.repeats", "20", "--model.init_args.steps", "4"],
    "distill-2rf": ["--trainer.val_check_interval", "3", "--data.init_args.batch_size", "32"],
    "distill-1rf": ["--trainer.val_check_interval", "3", "--data.init_args.batch_size", "32"],
    "distill-2rf:budgets": ["3", "6"],
    "distill-1rf:budgets": ["3", "6"],
    "perflow": ["--trainer.max_steps", "8", "--trainer.val_check_interval", "4", "--data.init_args.batch_size", "32"],
    "dmd": [
        "--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--data.init_args.batch_size", "32",
        "--model.init_args.generator_every", "2",
    ],
}  # fmt: skip


def _plan(out):
    from instaflow_pl.demo.plan import DemoPlan

    evaluation = {"samples_per_prompt": 4, "seeds": 2, "steps": (1, 4), "distill_val_pairs": 16}
    return DemoPlan(out, DEMO_CONFIGS, dict(TINY), evaluation)


@pytest.mark.slow
def test_demo_stages_run_cache_and_refuse_stale_results(tmp_path, monkeypatch, capsys):
    """Every configs/demo YAML runs through the CLI; a rerun skips; a changed config is refused until --force."""
    from instaflow_pl.demo.plan import STAGES
    from instaflow_pl.demo.stages import run_stages

    monkeypatch.setenv("WANDB_MODE", "offline")
    plan = _plan(tmp_path / "demo")
    times = run_stages(plan, jobs=2)  # the stages after pairs-1rf two at a time, each in its own process
    assert list(times) == list(STAGES)
    assert (plan.out / "logs" / "perflow.log").stat().st_size > 0 and not (plan.out / "logs" / "1rf.log").exists()
    report = json.loads((plan.out / "report.json").read_text())
    assert [f["key"] for f in report["findings"]] == ["a", "b", "c", "d", "e", "f"]
    assert {r["budget"] for r in report["students"]} == {0, 3, 6}
    assert [(r["steps"], r["guidance"]) for r in report["perflow"]] == [(1, 1.0), (4, 1.0), (1, 1.5), (4, 1.5)]
    assert report["perflow_windows"] == 4 and report["teacher_evaluations"]["PeRFlow"] == 2
    assert report["teacher_evaluations"]["2-RF"] == pytest.approx(200 * 4 * 2 / (8 * 32))  # 200 pairs of 4 guided
    assert json.loads((plan.model("perflow") / "instaflow.json").read_text())["windows"] == 4
    dmd = report["dmd"]
    assert (dmd["model"], dmd["steps"], dmd["guidance"], dmd["budget"]) == ("DMD student", 1, 1.0, 6)
    assert len(dmd["fid"]) == 2 and 0 <= dmd["accuracy_mean"] <= 1
    assert report["dmd_settings"] == {"iterations": 6, "batch_size": 32, "generator_every": 2, "real_guidance": 1.0}
    assert [(c["model"], c["steps"]) for c in report["dmd_coverage"]] == [
        ("1-RF", 4),
        ("student (2-RF)", 1),
        ("DMD student", 1),
    ]
    assert sum(report["dmd_coverage"][2]["shares"]) == pytest.approx(1.0)
    assert json.loads((plan.model("dmd") / "instaflow.json").read_text())["training_steps"] == 6
    markdown = (plan.out / "report.md").read_text()
    assert "## Distribution-matching distillation" in markdown and "| DMD student | 6 | 1 | 1 |" in markdown
    assert "**(f) distribution matching gives a one-step student" in markdown
    assert len(report["flows"]) == 2 * 2 * 2 and all(len(r["fid"]) == 2 for r in report["flows"])
    for name in ("report.md", "grid.png", "straightness.png"):
        assert (plan.out / name).stat().st_size > 0
    for model in ("1rf", "2rf", "student-2rf-3", "student-2rf-6", "student-1rf-6"):
        assert json.loads((plan.model(model) / "instaflow.json").read_text())["kind"] == "velocity"
    assert json.loads((plan.model("student-2rf-3") / "instaflow.json").read_text())["training_steps"] == 3
    assert list(plan.run_dir("1rf").glob("wandb/offline-run-*")), "each stage keeps an offline W&B run"

    capsys.readouterr()
    assert run_stages(plan) == {}  # everything cached
    assert capsys.readouterr().out.count("done earlier, skipped") == len(STAGES)

    plan.overrides["2rf"] = [*TINY["2rf"], "--model.init_args.prompt_dropout", "0.2"]
    with pytest.raises(UserError, match="2rf .*other settings.*--force"):
        run_stages(plan)
    untouched = (plan.out / "pairs" / "1rf" / "index.json").read_bytes()
    report_before = (plan.out / "report.md").read_text()
    times = run_stages(plan, ["2rf", "pairs-2rf", "distill-2rf", "report"], force=True)  # in this process
    assert list(times) == ["2rf", "pairs-2rf", "distill-2rf", "dmd", "report"]  # dmd starts from the 2-RF
    assert (plan.out / "pairs" / "1rf" / "index.json").read_bytes() == untouched  # upstream kept
    assert (plan.out / "report.md").read_text() != report_before
    assert run_stages(plan) == {}  # distill-1rf does not depend on the 2-RF: kept and still valid


def _finish(plan, *names):
    from instaflow_pl.demo.stages import _write_record, stage

    for name in names:
        for output in stage(name).outputs(plan):
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text("{}")
        _write_record(plan, stage(name), "done", 1.0)


def test_the_report_reads_perflow_when_it_is_done_and_its_hash_says_so(tmp_path):
    from instaflow_pl.demo.stages import _check_upstream, dependents, is_done, stage, stage_hash

    plan = _plan(tmp_path / "demo")
    (plan.out / "stages").mkdir(parents=True)
    assert stage("perflow").upstream == ("pairs-1rf",) and "perflow" not in stage("report").upstream
    assert dependents(["perflow"]) == ["perflow", "report"]  # --force --stage perflow redoes the report
    assert dependents(["pairs-1rf"])[-3:] == ["perflow", "dmd", "report"]  # dmd follows the 2-RF
    _finish(plan, "setup", "1rf", "pairs-1rf", "2rf", "pairs-2rf", "distill-2rf", "distill-1rf")
    _check_upstream(plan, ["report"])  # the report does not need the perflow stage
    without = stage_hash(plan, stage("report"))
    _finish(plan, "report")
    _finish(plan, "perflow")
    assert stage_hash(plan, stage("report")) != without  # a report written before perflow is stale now
    with pytest.raises(UserError, match="report .*other settings"):
        is_done(plan, stage("report"))


def test_the_report_reads_dmd_when_it_is_done_and_dmd_follows_the_2rf(tmp_path):
    from instaflow_pl.demo.stages import dependents, dmd_settings, stage, stage_hash

    plan = _plan(tmp_path / "demo")
    (plan.out / "stages").mkdir(parents=True)
    assert stage("dmd").upstream == ("2rf",) and stage("report").optional == ("perflow", "dmd")
    assert dependents(["dmd"]) == ["dmd", "report"]
    assert "dmd" in dependents(["2rf"]) and "dmd" not in dependents(["pairs-2rf", "distill-2rf", "perflow"])
    _finish(plan, "setup", "1rf", "pairs-1rf", "2rf", "pairs-2rf", "distill-2rf", "distill-1rf")
    without = stage_hash(plan, stage("report"))
    _finish(plan, "dmd")
    assert stage_hash(plan, stage("report")) != without  # a report written before dmd is stale now
    assert dmd_settings(plan) == {"iterations": 6, "batch_size": 32, "generator_every": 2, "real_guidance": 1.0}


def _coverage(model, steps, shares, guidance=1.0):
    from instaflow_pl.demo.evaluate import Coverage

    return Coverage(model, steps, guidance, shares, [0.99] * 10, [0.9] * 10)


def test_dmd_finding_follows_the_numbers_both_ways():
    from instaflow_pl.demo import report

    flows = [_row("1-RF", 25, w, fid) for w, fid in ((1.0, 1.4), (1.5, 1.6))] + [_row("1-RF", 1, 1.0, 7.5)]
    students = [_row("student (2-RF)", 1, 1.0, fid, accuracy=0.995, budget=b) for b, fid in ((500, 2.2), (6000, 2.0))]
    even = [0.1] * 10
    coverage = [_coverage("1-RF", 25, even), _coverage("student (2-RF)", 1, even), _coverage("DMD student", 1, even)]
    seconds = {"dmd": 118.0, "distill-2rf": 115.0}
    dmd = _row("DMD student", 1, 1.0, 1.3, accuracy=0.99, budget=3000)
    finding = report.finding_dmd(flows, students, dmd, coverage, seconds)
    assert finding.key == "f" and finding.reproduced is True  # 1.3 <= 1.0 x 1.4 (the 1-RF's best, w = 1)
    for text in ("3000 iterations", "FID 1.30 ± 0.00 = 0.93 x", "FID 1.40 ± 0.00 (w=1", "(6000 steps): FID 2.00",
                 "= 1.43 x", "accuracy 99.0%", "10.0%-10.0% vs", "118 s (dmd) vs 115 s (distill-2rf)"):  # fmt: skip
        assert text in finding.evidence, (text, finding.evidence)
    dmd.fid = [1.8, 1.8]  # above the teacher, below the regression student: partly
    assert report.finding_dmd(flows, students, dmd, coverage, seconds).reproduced is None
    dmd.fid = [2.1, 2.1]
    assert report.finding_dmd(flows, students, dmd, coverage, {}).verdict == "not reproduced"
    dmd.fid = [1.3, 1.3]
    dmd.accuracy = [0.85]
    assert report.finding_dmd(flows, students, dmd, coverage, seconds).reproduced is False
    dmd.accuracy = [0.99]
    coverage[2] = _coverage("DMD student", 1, [0.04] + [0.96 / 9] * 9)  # one digit left out: a mode lost
    collapsed = report.finding_dmd(flows, students, dmd, coverage, seconds)
    assert collapsed.reproduced is False and "4.0%-10.7% vs 10.0%-10.0%" in collapsed.evidence


@pytest.mark.parametrize("with_dmd", [False, True])
def test_the_reports_wandb_table_takes_the_dmd_row_only_when_there_is_one(tmp_path, monkeypatch, with_dmd):
    import wandb

    from instaflow_pl.demo import report

    monkeypatch.setenv("WANDB_MODE", "disabled")
    added = []
    monkeypatch.setattr(wandb.Table, "add_data", lambda self, *values: added.append(values[0]))
    flows = [_row("1-RF", 1, 1.0, 7.5, s=0.08).to_json()]
    summary = {"flows": flows, "students": [], "settings": {}, "findings": []}
    if with_dmd:
        summary["dmd"] = _row("DMD student", 1, 1.0, 1.6, budget=5000).to_json()
    try:
        report._log_wandb(_plan(tmp_path / "demo"), summary, {})
    finally:  # wandb keeps a process's first settings (the mode too): a later test in this process gets its own
        wandb.teardown()
    assert added == ["1-RF", "DMD student"][: 1 + with_dmd]


def test_coverage_counts_the_classifiers_readings_of_the_measured_samples(digits_base):
    from instaflow_pl.demo.classifier import DigitClassifier
    from instaflow_pl.demo.evaluate import EvalSettings, Evaluator, Row, load_flow

    torch.manual_seed(0)
    evaluator = Evaluator(DigitClassifier(width=16).eval(), EvalSettings(samples_per_prompt=6, seeds=2))
    flow = load_flow(digits_base)
    coverage = evaluator.coverage("base", flow, 2, 1.0)
    row = evaluator.measure(Row("base", "", 2, 1.0), flow)
    assert sum(coverage.shares) == pytest.approx(1.0)
    assert sum(coverage.accuracy) / 10 == pytest.approx(row.accuracy_mean)  # every digit asked equally often
    assert all(s > 0 for s in coverage.spread)


def test_teacher_evaluations_per_training_sample_follow_the_pairs_and_the_settings(tmp_path):
    from instaflow_pl.demo.plan import DemoPlan
    from instaflow_pl.demo.stages import teacher_evaluations

    plan = DemoPlan(tmp_path / "demo", DEMO_CONFIGS)
    plan.pairs("1rf").mkdir(parents=True)
    manifest = {"count": 20000, "steps": 25, "solver": "euler", "guidance": 1.5}
    (plan.pairs("1rf") / "manifest.json").write_text(json.dumps(manifest))
    # configs/demo: the 2-RF trains 6000 x 256 samples on 20000 pairs of 25 guided Euler steps (2 calls each);
    # piecewise reflow solves each sample's window in 2 Euler steps at guidance 1 (cfg_sync)
    assert teacher_evaluations(plan) == pytest.approx({"2-RF": 20000 * 25 * 2 / (6000 * 256), "PeRFlow": 2})
    plan.overrides["2rf"] = ["--trainer.max_steps", "1000"]
    plan.overrides["perflow"] = [
        "--model.init_args.window_solver_steps", "8", "--model.init_args.cfg_sync", "false",
        "--model.init_args.teacher_guidance", "7.5", "--model.init_args.teacher_solver", "midpoint",
    ]  # fmt: skip
    assert teacher_evaluations(plan) == pytest.approx({"2-RF": 20000 * 25 * 2 / (1000 * 256), "PeRFlow": 32})


def test_demo_stage_needs_its_upstream(tmp_path):
    from instaflow_pl.demo.stages import run_stages

    with pytest.raises(UserError, match="needs stage setup first"):
        run_stages(_plan(tmp_path / "demo"), ["1rf"])
    with pytest.raises(UserError, match="unknown demo stage"):
        run_stages(_plan(tmp_path / "demo"), ["3rf"])


def test_demo_refuses_a_foreign_folder_and_stale_or_interrupted_stages_before_deleting(tmp_path):
    from instaflow_pl.demo.stages import _write_record, is_done, run_stages, stage

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="holds no demo run"):
        run_stages(_plan(foreign), force=True)
    assert (foreign / "notes.txt").read_text() == "keep me"

    plan = _plan(tmp_path / "demo")
    (plan.out / "stages").mkdir(parents=True)
    for name in ("setup", "1rf"):
        for output in stage(name).outputs(plan):
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text("{}")
        _write_record(plan, stage(name), "done", 1.0)
    _write_record(plan, stage("pairs-1rf"), "started")  # interrupted with these settings: resumes
    assert is_done(plan, stage("1rf")) and not is_done(plan, stage("pairs-1rf"))
    plan.overrides["pairs-1rf"] = ["--data.init_args.repeats", "7"]  # interrupted with other settings: refused
    with pytest.raises(UserError, match="pairs-1rf .*was started \\(and interrupted\\) with other settings"):
        is_done(plan, stage("pairs-1rf"))

    plan.overrides["1rf"] = ["--trainer.max_steps", "5"]  # 1rf changed: forcing 2rf is refused, nothing deleted
    plan.model("2rf").mkdir(parents=True)
    with pytest.raises(UserError, match="1rf .*other settings"):
        run_stages(plan, ["2rf"], force=True)
    assert plan.model("2rf").is_dir()


def test_checkpoint_at_steps_never_replaces_another_runs_budgets(tmp_path):
    from types import SimpleNamespace

    from instaflow_pl.callbacks import CheckpointAtSteps
    from instaflow_pl.callbacks.budgets import budget_checkpoint

    callback = CheckpointAtSteps([5, 10], dirpath=str(tmp_path))
    budget_checkpoint(tmp_path, 10).write_text("another run")
    with pytest.raises(UserError, match="exists from another run"):
        callback.on_fit_start(SimpleNamespace(global_step=0), None)
    callback.on_fit_start(SimpleNamespace(global_step=10), None)  # resumed at 10: the file is this run's own
    with pytest.raises(UserError, match="step counts >= 1"):
        CheckpointAtSteps([0])


def test_evaluation_settings_are_checked():
    from instaflow_pl.demo.evaluate import EvalSettings

    with pytest.raises(UserError, match="include 1"):
        EvalSettings(steps=(2, 4))
    with pytest.raises(UserError, match="guidance must include 1"):
        EvalSettings(guidance=(1.5,))


def test_a_pixel_space_model_samples_through_the_pipeline_and_cli(digits_base, tmp_path):
    from PIL import Image

    from instaflow_pl.cli import main
    from instaflow_pl.pipeline import InstaFlowPipeline

    pipe = InstaFlowPipeline.from_pretrained(str(digits_base))
    assert pipe.vae is None and pipe.latent_shape() == (1, 8, 8)
    x0 = torch.randn(2, 1, 8, 8)
    latents = pipe(list(DIGIT_PROMPTS[:2]), latents=x0, output_type="latent").images
    assert latents.shape == (2, 1, 8, 8)
    with pytest.raises(UserError, match="must be 8"):
        pipe.latent_shape(16, 16)
    out = tmp_path / "grid.png"
    main(["sample", "--model", str(digits_base), "--prompt", DIGIT_PROMPTS[3], "--n", "2", "--out", str(out)])
    assert Image.open(out).size[0] > 0
