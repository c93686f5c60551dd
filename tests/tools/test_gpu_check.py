"""pirl-bench gpu (pirl_tools/gpu_check.py): the CPU dry mode writes the whole JSON with every CUDA part listed as
skipped for want of CUDA; a budget too small skips parts with the reason; bad arguments are one error line; the
wheelhouse size check refuses a wheelhouse over its limit. The real-size run needs a GPU (the `gpu` test)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from pirl.cli import parse_config
from pirl_tools import gpu_check
from pirl_tools.gpu_check import BACKBONES, GpuCheckConfig, GpuWheelsConfig, check_wheelhouse, run

CUDA_MODES = ("torch_eager_cuda", "torch_cuda_graph", "torch_compile_cuda")


def _run(tmp_path, *args: str, name: str = "gc") -> tuple[int, dict]:
    cfg = parse_config(GpuCheckConfig, prog="pirl-bench gpu", args=[f"--out={tmp_path / name}", *args])
    rc = run(cfg, "pirl-bench gpu (test)")
    return rc, json.loads((tmp_path / name / "gpu_check.json").read_text())


@pytest.fixture
def no_cuda(monkeypatch):
    """The CPU view of the check whatever box runs the tests."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_the_dry_mode_writes_every_figure_and_lists_the_cuda_parts_as_skipped(tmp_path, no_cuda):
    rc, report = _run(tmp_path, "--dry=true", "--iterations=2", "--num_denoise_steps=2")
    assert rc == 0 and report["dry"] is True and report["failed"] == {}
    m = report["machine"]
    assert m["torch"] == torch.__version__ and m["cpus"] >= 1 and m["hostname"] and "gpu" not in m
    assert report["preflight"] == {"missing_modules": {}, "device": "cpu"}
    assert report["settings"]["batch"] == 4 and report["settings"]["size"] == "reduced"
    assert set(report["backbones"]) == set(BACKBONES)
    for name, entry in report["backbones"].items():
        assert entry["parameters"] > 0 and sum(entry["parameters_by_dtype"].values()) == entry["parameters"]
        assert entry["parameters_by_dtype"].get("bfloat16", 0) > 0, name  # the bf16 path runs in the dry mode too
        assert entry["num_denoise_steps"] == 2 and "reduced size" in entry["source"]
        lat = entry["latency"]["torch_eager_cpu"]
        assert lat["n"] == 2 and 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"]
        for mode in CUDA_MODES:
            assert report["skipped"][f"{name}/{mode}"].startswith("no CUDA")
    ppo = report["ppo"]
    assert ppo["batch_chunks"] == ppo["samples_per_update"] == 4 and ppo["optimizer_steps_per_update"] == 1
    assert ppo["update_ms_p50"] > 0 and ppo["updates_timed"] == 1 and ppo["loss_finite"] is True
    assert ppo["trained_parameters"]["actor"] > 0 and "peak_memory_allocated_gib" not in ppo
    assert report["skipped"]["pi0/ppo_peak_memory"].startswith("no CUDA")
    assert report["skipped"]["roofline"].startswith("no CUDA") and report["roofline"] is None


def test_a_budget_too_small_skips_each_part_with_the_reason(tmp_path, no_cuda):
    rc, report = _run(tmp_path, "--dry=true", "--time_budget_s=0.001", "--backbones=[pi0,smolvla]")
    assert rc == 0 and report["failed"] == {}
    for part in ("pi0/build", "smolvla/build"):
        assert report["skipped"][part].startswith("time budget:")
    assert report["backbones"]["pi0"] == {"latency": {}} and report["ppo"] is None


def test_a_missing_module_skips_the_lerobot_parts_and_names_it(tmp_path, no_cuda, monkeypatch):
    monkeypatch.setitem(gpu_check.REQUIRED_MODULES, "no_such_module_for_the_test", "no-such-dist")
    rc, report = _run(tmp_path, "--dry=true", "--backbones=[pi05]")
    assert rc == 0 and report["preflight"]["missing_modules"] == {"no_such_module_for_the_test": "no-such-dist"}
    assert "no_such_module_for_the_test (no-such-dist)" in report["skipped"]["pi05"]
    assert report["backbones"]["pi05"] == {"latency": {}}


def test_full_size_without_cuda_points_at_the_dry_mode(tmp_path, no_cuda):
    rc, report = _run(tmp_path, "--backbones=[pi0]")
    assert rc == 1 and "--dry=true" in report["skipped"]["pi0"] and report["backbones"] == {}


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--backbones=[pi1]"], "backbones"),
        (["--time_budget_s=0"], "time_budget_s"),
        (["--iterations=0"], "iterations"),
        (["--compile_mode=fast"], "compile_mode"),
        (["--dry=maybe"], "dry"),
    ],
)
def test_a_bad_argument_is_one_error_line(args, field, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["gpu_check", f"--out={tmp_path}", *args])
    with pytest.raises(SystemExit) as e:
        gpu_check.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error" in err and field in err and "Traceback" not in err
    assert not (tmp_path / "gpu_check.json").exists()


def test_the_missing_out_and_a_bad_wheels_argument_are_one_error_line(monkeypatch, capsys):
    for argv, word in ((["gpu_check", "--dry=true"], "out"), (["gpu_check", "wheels", "--leave_out=[nope]"], "nope")):
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as e:
            gpu_check.main()
        err = capsys.readouterr().err
        assert e.value.code == 2 and word in err and "Traceback" not in err


def test_the_wheelhouse_size_check(tmp_path):
    (tmp_path / "a-1.0-py3-none-any.whl").write_bytes(b"\0" * 2**20)
    (tmp_path / "big-2.0-py3-none-any.whl").write_bytes(b"\0" * 2 * 2**20)
    (tmp_path / "requirements.txt").write_text("a\nbig\n" * 10**5)  # not a wheel: not counted
    assert check_wheelhouse(tmp_path, 3.0) == pytest.approx(3.0)
    with pytest.raises(ValueError, match=r"3\.0 MiB of wheels, over the 2\.5 MiB limit; largest: big-2\.0"):
        check_wheelhouse(tmp_path, 2.5)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no wheels"):
        check_wheelhouse(empty, 64)
    # the default leaves out what does not fit; every name it leaves out is one the list holds
    assert set(GpuWheelsConfig().leave_out) <= set(gpu_check.WHEELHOUSE)


def test_a_part_that_overruns_is_abandoned_and_one_that_raises_hands_back_its_error():
    import threading

    release = threading.Event()
    finished, result, error = gpu_check._in_thread(release.wait, 0.01)  # a compile that never ends in time
    assert (finished, result, error) == (False, None, None)
    release.set()
    assert gpu_check._in_thread(lambda: 7, 60) == (True, 7, None)
    finished, _, error = gpu_check._in_thread(lambda: 1 / 0, 60)
    assert finished and isinstance(error, ZeroDivisionError)
    assert (
        gpu_check._error(RuntimeError("CUDA out of memory.\nTried to allocate")) == "RuntimeError: CUDA out of memory."
    )


def test_pirl_bench_help_lists_gpu(monkeypatch, capsys):
    from pirl_tools import bench

    monkeypatch.setattr(sys, "argv", ["pirl-bench", "--help"])
    with pytest.raises(SystemExit) as e:
        bench.main()
    out = capsys.readouterr().out
    assert e.value.code == 0 and "gpu" in out.splitlines()[0] and "pirl-bench gpu" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_dry_mode_on_cuda_times_every_mode(tmp_path):
    rc, report = _run(tmp_path, "--dry=true", "--backbones=[pi0]", "--compile=false")
    assert rc == 0 and report["failed"] == {}, report["failed"]
    lat = report["backbones"]["pi0"]["latency"]
    assert lat["torch_eager_cuda"]["p50_ms"] > 0 and lat["torch_cuda_graph"]["p50_ms"] > 0
    assert report["ppo"]["peak_memory_allocated_gib"] > 0 and report["roofline"]["bf16_matmul_tflops"] > 0
    assert report["machine"]["gpu"] and report["skipped"]["pi0/torch_compile_cuda"] == "compile=false"
