"""The one-command pipeline on a tiny config: every stage, the report, and a rerun that skips
finished stages and resumes the rest."""
from __future__ import annotations

import json

import pytest

from pidnet import train
from pidnet.config import load_config
from pidnet.demo import main as demo_main

from .helpers import TINY_HOOKS, TINY_NET_USER, tiny_config


def test_demo_runs_every_stage_and_reports_what_the_files_hold(tmp_path, capsys, monkeypatch):
    cfg = tiny_config(tmp_path, hooks=TINY_HOOKS, user=TINY_NET_USER,
                      train={"epochs": 2, "lr": 0.05, "log_interval": 0},
                      qat={"epochs": 2, "freeze_bn_epochs": 2, "log_interval": 0},
                      calib={"num_batches": 1, "percentiles": [90.0, 99.99]},
                      sensitivity={"num_batches": 1, "tolerance": 100.0},
                      export={"target": "onnxruntime", "eval_batches": 1, "latency_runs": 3})
    runs = tmp_path / "runs"
    # Ctrl-C right after QAT direct's first epoch was saved: the demo stops with its code, the
    # rerun skips the finished stages and trains direct's remaining epoch from last.pt
    save, saved = train._save, []

    def record(out, model, mode, optimizer, scheduler, epoch, *args, **kwargs):
        save(out, model, mode, optimizer, scheduler, epoch, *args, **kwargs)
        saved.append((mode, epoch))

    def interrupt_after_first_direct_epoch():          # the end of an epoch, once saved
        if saved[-1] == ("direct", 1):
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "_save", record)
    monkeypatch.setattr(train, "barrier", interrupt_after_first_direct_epoch)
    with pytest.raises(SystemExit) as stopped:
        demo_main(["--config", str(cfg), "--runs", str(runs)])
    assert stopped.value.code == 130
    err = capsys.readouterr().err
    assert f"{runs / 'qat_direct' / 'last.pt'} holds epoch 1 of 2" in err
    assert not (runs / "qat_direct" / "results.json").exists()
    monkeypatch.undo()
    float_mtime = (runs / "float" / "best.pt").stat().st_mtime_ns
    assert demo_main(["--config", str(cfg), "--runs", str(runs)]) == 0
    log = capsys.readouterr().err
    for stage in ("float", "calibrate", "qat calib", "qat stats"):
        assert f"stage {stage}: finished earlier" in log
    assert f"resumed {runs / 'qat_direct' / 'last.pt'} at epoch 1" in log
    assert (runs / "float" / "best.pt").stat().st_mtime_ns == float_mtime
    # the resumed run is the uninterrupted one, epoch by epoch
    direct_args = ["--mode", "direct", "--config", str(runs / "qat_direct" / "config.yaml"),
                   "--set", f"output_dir={tmp_path / 'direct_uninterrupted'}"]
    assert train.main(direct_args) == 0
    resumed, whole = (json.loads((d / "results.json").read_text())["epochs"] for d in
                      (runs / "qat_direct", tmp_path / "direct_uninterrupted"))
    assert len(resumed) == 2 and [e["miou"] for e in resumed] == pytest.approx(
        [e["miou"] for e in whole], abs=1e-6)
    summary = json.loads((runs / "summary.json").read_text())
    report = (runs / "report.md").read_text()
    ptq = json.loads((runs / "calibrate" / "results.json").read_text())
    export = json.loads((runs / "export" / "results.json").read_text())
    rows = {r["stage"]: r for r in summary["rows"]}
    assert rows["float"]["miou"] == ptq["float"]["miou"]
    for method in ptq["methods"]:
        assert rows[f"PTQ {method['method']}"]["miou"] == method["miou"]
    chosen = ptq["best_config"]   # QAT starts from the calibration PTQ chose on val
    assert chosen == next(m for m in ptq["methods"] if m["method"] == ptq["best_method"])["config"]
    for mode in ("calib", "stats", "direct"):
        res = json.loads((runs / f"qat_{mode}" / "results.json").read_text())
        ran = load_config(runs / f"qat_{mode}" / "config.yaml")
        assert (ran.calib.method, ran.qat.stats_range) == (chosen["calib.method"],) * 2
        assert ran.calib.percentile == chosen.get("calib.percentile", 99.99)
        row = rows[f"QAT {mode} (final epoch; best)"]
        assert (row["miou"], row["best"]) == (res["final"]["miou"], res["best"])
        assert f"{res['final']['miou']:.2f}" in report
    assert summary["speedup"] == export["latency"]["speedup_over_float"]["int8"]
    assert summary["agreement"] == export["agreement"]
    assert f"{export['agreement']:.2%}" in report
    # the export gate is in the metric's units, met on the default path
    assert summary["metric_drop"] == export["metric_drop"] <= export["max_metric_drop"] == 0.3
    gate = f"{export['metric_drop']:.2f} below PyTorch fake-quant (gate: at most 0.3: met)"
    assert gate in report
    assert (runs / "export" / "layers.csv").exists()
    assert (runs / "qat_curves.png").exists() and (runs / "float_curve.png").exists()
    float_curve = [e["miou"] for e in json.loads((runs / "float" / "results.json").read_text())[
        "epochs"]]
    assert "val miou per epoch (float/results.json): " + ", ".join(
        f"{v:.2f}" for v in float_curve) in report
    assert (runs / "sensitivity" / "sensitivity.png").exists()
    # the sweep measures the float model at W4A4, from the calibration PTQ chose; the export
    # takes the best quantized model, not the sweep's 4-bit selection
    swept = load_config(runs / "sensitivity" / "config.yaml")
    assert (swept.quant.weight_bits, swept.quant.act_bits) == (4, 4)
    assert swept.model_path == str(runs / "float" / "best.pt")
    assert swept.calib.method == chosen["calib.method"]
    sens = json.loads((runs / "sensitivity" / "results.json").read_text())
    assert (f"at W4A4 (PTQ miou {sens['baseline']['quantized']:.2f} against float "
            f"{sens['baseline']['float']:.2f} on 1 val batches)") in report
    exported = load_config(runs / "export" / "config.yaml").model_path
    assert exported.startswith(str(runs)) and "sensitivity" not in exported

    # a rerun after the sweep and the export lost their results: the sweep resumes from its
    # rows (no --force), the export runs again, the report is the same
    for stage in ("sensitivity", "export"):
        (runs / stage / "results.json").unlink()
    capsys.readouterr()
    assert demo_main(["--config", str(cfg), "--runs", str(runs)]) == 0
    log = capsys.readouterr().err
    assert "stage qat direct: finished earlier" in log
    sweep = next(line for line in log.splitlines() if "stage sensitivity:" in line)
    assert "--force" not in sweep
    assert json.loads((runs / "summary.json").read_text())["rows"] == summary["rows"]
