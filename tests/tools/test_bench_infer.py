"""``pirl-bench infer``: the JSON the issue asks for, with every GPU column either timed or listed as
skipped with its reason (on a machine without CUDA, all of them are skipped)."""

import json
import sys

import pytest
import torch

from pirl_tools import bench

GPU_COLUMNS = {
    "torch_eager_cuda",
    "torch_cuda_graph",
    "torch_compile_cuda",
    "onnxruntime_cuda",
    "tensorrt",
    "tensorrt_cuda_graph",
}


def test_infer_writes_backends_side_by_side_and_skip_reasons(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pirl-bench", "infer", f"--out={tmp_path}", "--iterations=3", "--warmup=1"])
    with pytest.raises(SystemExit) as exc:
        bench.main()
    assert exc.value.code == 0
    report = json.loads((tmp_path / "infer.json").read_text())
    backends, skipped = report["backends"], report["skipped"]
    assert {"torch_eager", "onnxruntime_cpu", "onnxruntime_cpu_split"} <= set(backends)
    for name, row in backends.items():
        assert set(row) == {"median_ms", "p99_ms", "ratio_vs_torch"} and row["median_ms"] > 0, name
    assert backends["torch_eager"]["ratio_vs_torch"] == 1.0
    assert 0 <= report["parity_max_abs_err"] < 1e-5
    assert set(backends) | set(skipped) == {"torch_eager", "onnxruntime_cpu", "onnxruntime_cpu_split"} | GPU_COLUMNS
    assert not set(backends) & set(skipped) and all(skipped.values())
    if not torch.cuda.is_available():
        assert set(skipped) == GPU_COLUMNS
        assert set(skipped.values()) == {"no CUDA device (torch.cuda.is_available() is False)"}


def test_infer_times_only_the_selected_backends_and_exports_only_for_them(tmp_path, monkeypatch):
    """backends=[torch_eager] (a full-size VLA on a CPU box): no export, every other column skipped as
    not selected; the parameter breakdown names the policy's parts."""
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "pirl-bench",
            "infer",
            f"--out={tmp_path}",
            "--iterations=2",
            "--warmup=0",
            "--backends=[torch_eager]",
        ],
    )
    with pytest.raises(SystemExit) as exc:
        bench.main()
    assert exc.value.code == 0
    report = json.loads((tmp_path / "infer.json").read_text())
    assert set(report["backends"]) == {"torch_eager"}
    assert set(report["skipped"]) == {"onnxruntime_cpu", "onnxruntime_cpu_split"} | GPU_COLUMNS
    assert set(report["skipped"].values()) == {"not selected (backends)"}
    assert report["export_seconds"] is None and report["parity_max_abs_err"] is None
    assert not (tmp_path / "onnx").exists() and not (tmp_path / "onnx_split").exists()
    parts = report["policy"]["parameters_by_module"]
    assert {"backbone", "value_head"} <= set(parts)
    assert all(0 < n <= report["policy"]["parameters"] for n in parts.values())


def test_infer_refuses_an_unknown_backend(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["pirl-bench", "infer", f"--out={tmp_path}", "--backends=[tensorrtt]"])
    with pytest.raises(SystemExit) as exc:
        bench.main()
    assert exc.value.code == 2 and "backends: unknown ['tensorrtt']" in capsys.readouterr().err
