"""The evaluation tools: math benchmark scoring, regime comparison, step benchmark."""

import json
from pathlib import Path

import pytest

from tests.tool_loader import load_tool

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests/fixtures/math5.jsonl"


def _tools():
    return {name: load_tool(name) for name in ("eval_math", "compare_regimes", "bench_step")}


def test_eval_math_scores_equivalent_latex_and_rejects_wrong_answers():
    em = _tools()["eval_math"]
    probs = em.load_benchmark(str(FIXTURE))
    assert [p.answer for p in probs][:3] == ["\\frac{1}{2}", "\\frac{\\sqrt{2}}{2}", "3"]
    greedy = [
        r"so the answer is \boxed{0.5}",  # = 1/2
        r"\boxed{\frac{1}{\sqrt{2}}}",  # = √2/2
        r"\boxed{-3}",  # wrong sign
        r"\boxed{2^{10}}",  # = 1024
        r"the answer is 25%",  # no \boxed: not accepted
    ]
    sampled = [
        [r"\boxed{1/2}", r"\boxed{2}"],
        [r"\boxed{\sqrt{2}/2}", r"\boxed{\sqrt{2}}"],
        [r"\boxed{3}", r"\boxed{3.0}"],
        [r"\boxed{1000}", r"\boxed{1024}"],
        [r"\boxed{25\%}", r"\boxed{0.25}"],
    ]
    res = em.score(probs, greedy, sampled)
    assert res["correct_greedy"] == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert res["pass@1"] == pytest.approx(3 / 5)
    assert res["correct_sampled"][:4] == [[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]
    assert res["correct_sampled"][4][0] == 1.0
    assert res["pass@k"] == pytest.approx(1.0)
    table = em.markdown({"math5": res})
    assert "| math5 | 5 | 0.600 |" in table


def test_benchmark_layouts(tmp_path):
    em = _tools()["eval_math"]
    f = tmp_path / "olympiad.jsonl"
    f.write_text(json.dumps({"question": "q", "final_answer": ["$\\frac{1}{3}$"]}) + "\n")
    assert em.load_benchmark(str(f))[0].answer == "\\frac{1}{3}"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"q": "x"}) + "\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: expected a problem field"):
        em.load_benchmark(str(bad))
    assert em.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert em.pass_at_k(4, 0, 2) == 0.0


def test_eval_math_runs_end_to_end_with_the_local_engine(tmp_path):
    em = _tools()["eval_math"]
    res = em.main(
        [
            "--data",
            str(FIXTURE),
            "--k",
            "2",
            "--max-new-tokens",
            "4",
            "--out",
            str(tmp_path),
            "--preset",
            "tiny-dense",
            "--seq-length",
            "96",
        ]  # fmt: skip
    )
    assert res["math5"]["n"] == 5 and 0.0 <= res["math5"]["avg@k"] <= 1.0
    assert (tmp_path / "results.md").read_text().startswith("| benchmark |")


@pytest.mark.slow  # ~40 s: every regime through the tool; the per-estimator rows test stays fast
def test_compare_regimes_smoke(tmp_path):
    cr = _tools()["compare_regimes"]
    cr.main(
        [
            "--out", str(tmp_path), "--regimes", "detach,occ+head-distill", "--seeds", "1", "--num-steps", "2",
            "--jobs", "2", "--spec-prompts", "4",
            "--pretrain-extra", "--num-steps 3",
            "--extra", "--rollout-batch-size 4 --n-samples-per-prompt 4 --global-batch-size 8 --micro-batch-size 8 "
            "--num-eval-prompts 8 --eval-interval 1",
        ]
    )  # fmt: skip
    text = (tmp_path / "results.md").read_text()
    assert "| detach |" in text and "| occ+head-distill |" in text
    # depth-1/2 acceptance and the measured self-speculative accept length (≥ 1 token per round)
    row = next(line for line in text.splitlines() if line.startswith("| occ+head-distill |"))
    assert row.count("±") == 5, row
    spec = json.loads((tmp_path / "spec_detach_seed1234.json").read_text())
    assert 1.0 <= spec["accept_len"] <= 3.0
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    assert (tmp_path / "dynamics.png").stat().st_size > 1000
    # Resuming a finished comparison reruns nothing.
    before = (tmp_path / "occ+head-distill_seed1234.jsonl").stat().st_mtime
    cr.main(["--out", str(tmp_path), "--regimes", "detach,occ+head-distill", "--seeds", "1", "--num-steps", "2"])
    assert (tmp_path / "occ+head-distill_seed1234.jsonl").stat().st_mtime == before


def test_bench_step_smoke(capsys):
    bs = _tools()["bench_step"]
    bs.main(
        ["--preset", "tiny-dense", "--reps", "1", "--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
         "--global-batch-size", "8", "--micro-batch-size", "8", "--seq-length", "16", "--num-eval-prompts", "8"]
    )  # fmt: skip
    out = capsys.readouterr().out
    for r in ("none", "detach", "ce", "policy", "occ"):
        assert any(line.startswith(f"{r:6s} |") and line.count("x") >= 1 for line in out.splitlines()), r
    assert "headline: occ / policy step time" in out


def test_compare_regimes_rows_per_estimator():
    rows = _tools()["compare_regimes"].estimator_rows
    assert list(rows(["occ"], ["grpo"])) == ["occ"]  # the default keeps the plain names (and run files)
    both = rows(["detach", "occ"], ["grpo", "gae"])
    assert list(both) == ["detach@grpo", "occ@grpo", "detach@gae", "occ@gae"]
    assert both["occ@gae"][-2:] == ["--advantage-estimator", "gae"] and "--mtp-regime" in both["occ@gae"]
