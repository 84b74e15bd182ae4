"""The training demo (python -m cupylars.demo), run with tiny settings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cupylars import demo  # noqa: E402


def test_dataset_is_deterministic_balanced_and_standardised():
    x, y = demo.make_dataset(500, seed=3)
    x2, y2 = demo.make_dataset(500, seed=3)
    assert x.shape == (500, 1, 16, 16) and x.dtype == np.float32 and y.dtype == np.int64
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert not np.array_equal(x, demo.make_dataset(500, seed=4)[0])
    assert np.bincount(y, minlength=10).tolist() == [50] * 10
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3


def test_demo_trains_and_prints_the_table(tmp_path, capsys):
    args = ["--train-size", "1024", "--test-size", "256", "--batch-size", "256", "--epochs", "3",
            "--width", "16", "--plot", str(tmp_path / "loss.png")]  # fmt: skip
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    assert "epoch 3/3" in out  # progress while it runs
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0] in ("LARS32bit", "LARS8bit", "SGD") and "%" in line:
            rows[cells[0]] = cells
    assert set(rows) == {"LARS32bit", "LARS8bit", "SGD"}
    for name, (_, loss, accuracy, _bytes, step_ms, train_s) in rows.items():
        assert np.isfinite(float(loss)) and float(step_ms) > 0 and float(train_s) > 0
        if name.startswith("LARS"):  # learning after 12 large-batch steps
            assert float(loss) < 2.0, name  # chance level is log(10) = 2.30
            assert float(accuracy.rstrip("%")) > 30.0, name
    state_bytes = {name: int(cells[3].replace(",", "")) for name, cells in rows.items()}
    assert state_bytes["LARS8bit"] < state_bytes["LARS32bit"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in out
    else:
        assert (tmp_path / "loss.png").stat().st_size > 0


def test_demo_subset_and_bad_arguments(capsys):
    assert demo.main(["--optimizers", "Adam"]) == 2
    assert "unknown optimizer" in capsys.readouterr().err
    assert demo.main(["--epochs", "0"]) == 2


def test_module_help():
    result = subprocess.run(
        [sys.executable, "-m", "cupylars.demo", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert re.search(r"--batch-size", result.stdout) and "LARS8bit" in result.stdout
    # One entry per option; each says its default at most once, and never a meaningless one.
    entries = re.split(r"\n  (?=-)", result.stdout.split("options:", 1)[1])[1:]
    assert len(entries) == len(demo.build_parser()._actions)
    for entry in entries:
        text = " ".join(entry.split())
        assert text.count("default") <= 1, text
        assert "(default: None)" not in text and "(default: False)" not in text, text
    flat = " ".join(result.stdout.split())
    assert "--device DEVICE torch device (default: cuda when available, else cpu)" in flat
    assert "--lr LR peak learning rate of the LARS optimizers (default: 4.0)" in flat


def test_batch_norm_statistics_are_recomputed_from_current_weights():
    torch.manual_seed(0)
    model = demo.make_model(8)
    x = torch.from_numpy(demo.make_dataset(200, seed=5)[0])
    bn = model[1]
    bn.running_mean.fill_(5.0)  # stale statistics, as after fast weight changes
    bn.running_var.fill_(9.0)
    weights = [p.detach().clone() for p in model.parameters()]
    demo._refresh_batch_norm(model, x, batch_size=64, batches=2)
    # Independently: the first conv's output on the two batches, per channel; the cumulative
    # average of per-batch statistics (batch norm's running variance is unbiased).
    with torch.no_grad():
        batches = [model[0](x[:64]), model[0](x[64:128])]
    means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    variances = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, variances, rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1 and model[5].momentum == 0.1  # restored for training
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


def test_first_run_builds_the_native_backend_before_the_timed_steps(tmp_path):
    """A fresh cache: the build is announced, with where it goes and how long it took, and
    finishes before the first timed LARS step (the progress lines of training come after);
    a second run loads the cached build and says nothing about it."""
    root = Path(demo.__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUPYLARS_")}
    env["CUPYLARS_CACHE_DIR"] = str(tmp_path)
    command = [sys.executable, "-m", "cupylars.demo", "--train-size", "256", "--test-size", "64",
               "--batch-size", "128", "--epochs", "1", "--optimizers", "LARS32bit,SGD", "--no-plot",
               "--device", "cpu"]  # fmt: skip

    def run() -> list[str]:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=root, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    lines = run()
    folder = tmp_path / "cpu"
    announce = lines.index(f"building the native CPU backend (first use, cached in {folder}) ...")
    built = next(i for i, line in enumerate(lines) if line.startswith("built the native CPU backend in "))
    first_step = next(i for i, line in enumerate(lines) if "[LARS32bit] epoch 1/1" in line)
    assert lines[0].startswith("cupylars demo on cpu") and 0 < announce < built < first_step
    assert re.fullmatch(r"built the native CPU backend in \d+\.\d s", lines[built])
    assert len(list(folder.glob("*.so"))) == 1
    again = run()
    assert not any("native CPU backend" in line for line in again)
    assert any("[LARS32bit] epoch 1/1" in line for line in again)
