"""BENCHMARKS.md's generated blocks equal what benchmarks/report.py makes from the stored outputs."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "BENCHMARKS.md"
RESULTS = ROOT / "benchmarks" / "results" / "cpu"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("benchmarks_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_repository_document_matches_its_stored_outputs(report, capsys):
    assert report.check(DOC, RESULTS) == 0, capsys.readouterr().err
    names = [name for name, _, _ in report.find_blocks(DOC.read_text())]
    assert {"demo", "latent-step0", "estimators-latents", "finetune-bold", "sampler-overhead"} <= set(names)


def test_a_changed_number_is_caught_and_named(report, tmp_path, capsys):
    doc = tmp_path / "BENCHMARKS.md"
    text = DOC.read_text()
    assert "| sdo | 0.161 | 0.949 | 10% -> 7% | 90.65 -> 83.09 |" in text
    doc.write_text(text.replace("| sdo | 0.161 | 0.949 | 10% -> 7% |", "| sdo | 0.161 | 0.948 | 10% -> 7% |"))
    assert report.check(doc, RESULTS) == 1
    err = capsys.readouterr().err
    assert "'finetune-bold' differs" in err and "'demo'" not in err
    assert report.main([str(RESULTS), "--write", str(doc)]) == 0
    assert doc.read_text() == text


def test_a_block_with_missing_outputs_is_an_error_not_a_skip(report, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results, ignore=shutil.ignore_patterns("*.png", "*.safetensors", "checkpoints"))
    (results / "sampler-overhead.txt").unlink()
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(DOC.read_text())
    assert report.check(doc, results) == 1
    assert "block 'sampler-overhead': missing output" in capsys.readouterr().err
    assert report.main([str(results), "--write", str(doc)]) == 1  # nothing written on any error
    assert doc.read_text() == DOC.read_text()


def test_unknown_and_unclosed_blocks_are_errors(report, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- generated: no-such-block -->\nx\n<!-- /generated -->\n")
    assert report.check(doc, RESULTS) == 1
    doc.write_text("<!-- generated: demo -->\nx\n")
    assert report.check(doc, RESULTS) == 1
    with pytest.raises(report.BlockError):
        report.find_blocks("<!-- generated: a -->\n<!-- generated: b -->\n<!-- /generated -->\n")


def test_write_replaces_only_the_blocks(report, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n\n<!-- generated: sampler-overhead -->\nold\n<!-- /generated -->\n\nafter\n")
    assert report.write(doc, RESULTS) == 0
    text = doc.read_text()
    assert text.startswith("intro\n\n<!-- generated: sampler-overhead -->\n- **Sampler overhead**: plain diffusers")
    assert text.endswith("The target was under 5%.\n<!-- /generated -->\n\nafter\n")
    assert report.check(doc, RESULTS) == 0


def _bench_row(method, steps, seconds, memory=0, reward=-1.0, first=None):
    return {
        "method": method,
        "steps": steps,
        "s_per_iter": seconds,
        "first_iter_s": seconds if first is None else first,
        "peak_mem_bytes": memory,
        "reward_final": reward,
    }


def _scale_outputs(out: Path) -> Path:
    """A tiny fake of benchmarks/run_scale.sh's timed outputs."""
    scale = out / "scale"
    compile_rows = [
        _bench_row("sdo", 20, 3.0, reward=-5.0, first=4.5),
        _bench_row("nograd", 20, 2.5, first=5.0),
        _bench_row("sdo+compile", 20, 2.7, reward=-5.0, first=120.7),
        _bench_row("nograd+compile", 20, 2.2, first=2.25),
    ]
    (scale / "compile").mkdir(parents=True)
    (scale / "compile" / "bench.json").write_text(json.dumps({"config": {"iters": 6}, "rows": compile_rows}))
    processes = scale / "processes"
    for run in (1, 2, 3):
        for count, wall in ((1, 90.0), (2, 72.0 + run)):
            folder = processes / f"run-{run}-{count}proc"
            folder.mkdir(parents=True)
            (processes / f"run-{run}-{count}proc.wall").write_text(f"{wall}\n")
            items = [{"index": i, "seconds": 10.0 + i, "reward_final": -1.0 - i} for i in range(6)]
            (folder / "summary.json").write_text(json.dumps({"processes": count, "per_item": items}))
    for workload in ("mnist", "sd15-tiny"):
        plan = [
            {"method": m, "steps": 4, "saved_bytes": b * 2**20, "relative_time": t}
            for m, b, t in (("sdo", 26.0, 1.25), ("full", 104.0, 2.0), ("checkpointed", 0.5, 3.0), ("nograd", 0, 1))
        ]
        measured = [
            _bench_row(m, 4, s, memory=int(b * 2**20))
            for m, b, s in (("sdo", 26.0, 1.25), ("full", 100.0, 2.2), ("checkpointed", 0.52, 3.1), ("nograd", 0, 1))
        ]
        for name, rows in ((f"plan-{workload}", plan), (f"measured-{workload}", measured)):
            (scale / name).mkdir()
            (scale / name / ("plan.json" if name.startswith("plan") else "bench.json")).write_text(
                json.dumps({"rows": rows})
            )
    return out


def test_the_timed_scale_blocks_from_fake_outputs(report, tmp_path):
    out = _scale_outputs(tmp_path)
    compiled = report.render("scale-compile", out)
    assert "| sdo+compile | 2.700 (0.90x) | 120.7 s | -5.000 |" in compiled
    assert "| nograd | 2.500 | 5.00 s |  |" in compiled
    assert "Compile time: about 118 s" in compiled and "after about 393 iterations" in compiled
    processes = report.render("scale-processes", out)
    assert "| 1 | 90.0 | 73.0 | 0.81 |" in processes and "| 3 | 90.0 | 75.0 | 0.83 |" in processes
    assert "Median ratio: 0.82. **The 0.6x target was not met.**" in processes
    # 1 process: 10+...+15 = 75 s; 2 processes: the odd items, 11+13+15 = 39 s
    assert "The item phase alone reached 0.52 to 0.52" in processes and "differ by at most 0" in processes
    planned = report.render("scale-plan-vs-measured", out)
    assert "| mnist | 4 | full | 104.00 MiB | 100.00 MiB | 2.00 / 2.20 |" in planned
    assert "| sd15 tiny | 4 | checkpointed | 0.50 MiB | 0.52 MiB | 3.00 / 3.10 |" in planned
    assert "Memory agrees within 4% everywhere" in planned


def test_the_timed_scale_blocks_need_their_outputs(report, tmp_path):
    out = _scale_outputs(tmp_path)
    (out / "scale" / "processes" / "run-2-2proc.wall").unlink()
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- generated: scale-processes -->\n<!-- /generated -->\n")
    assert report.write(doc, out) == 1
    with pytest.raises(report.BlockError, match=r"run-2-2proc\.wall"):
        report.render("scale-processes", out)


def test_the_kl_blocks_from_fake_runs(report, tmp_path):
    bold = tmp_path / "bold-kl"
    accuracy = {0: (0.4, 0.1, 0.08, 0.07), 10: (0.6, 0.31, 0.4, 0.5), 20: (0.85, 0.73, 0.8, 0.84)}
    accuracy[30] = (0.9, 0.84, 0.88, 0.9)
    for weight, judged in accuracy.items():
        (bold / f"kl{weight}").mkdir(parents=True)
        records = []
        for step in range(1, 41):
            record = {"step": step, "reward": 0.1 + step / (100 + weight)}
            if step % 10 == 0:
                record |= {"judge_accuracy": judged[step // 10 - 1], "frechet_judge": 80.0 / (1 + weight) + step / 10}
            records.append(record)
        (bold / f"kl{weight}" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (bold / "base.json").write_text(json.dumps({"judge_accuracy": 0.96, "frechet_judge": 1.3206}))
    shutil.copytree(bold / "kl0", tmp_path / "finetune-bold-sdo")
    assert report.render("kl-base", tmp_path) == (
        "The base model before fine-tuning: judge accuracy 96%, Fréchet distance 1.32.\n"
    )
    table = report.render("kl-table", tmp_path)
    assert "| 0 (without) |" in table and "| **30** |" in table and "**84% -> 90%**" in table
    findings = " ".join(report.render("kl-findings", tmp_path).split())
    assert "identical to the `bold` table above" in findings
    assert "falls to 40% after 10 updates and 7% after 40" in findings
    assert "**With `--kl-weight 30`**" in findings and "stays at or above 84%" in findings
    assert "A weight of 20 falls to 73% at 20 updates (84% at 40)" in findings
