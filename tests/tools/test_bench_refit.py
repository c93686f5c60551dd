"""pirl-bench refit on the small default policy: the refit export moves only the trained tensors (and a
small manifest) per version after the first; the full export moved the whole export again."""

from __future__ import annotations

from helpers.policy import builtin_policy
from pirl_tools.bench_refit import measure


def test_refit_moves_only_the_trained_tensors_per_version(tmp_path):
    policy = builtin_policy(0)[0].eval()
    figures = measure(policy, tmp_path, chunk_bytes=64 << 10)  # chunked: the edge reuses files by hash
    full, refit = figures["full_export"], figures["refit_export"]
    assert not refit["inline"] and refit["edge_prepare_method"] == "refit"
    listed = refit["listed"]
    assert refit["bytes_after_first"] == listed["model.safetensors"] + listed["onnx/manifest.json"]
    assert refit["bytes_reused_on_edge"] == 2 * (listed["onnx/model.onnx"] + listed["onnx/frozen.onnx.data"])
    # the full export changed its graph file (weights inside) and its full state dict every version
    assert {"model.onnx", "model.safetensors"} <= set(full["changed_files"])
    assert full["bytes_after_first"] > 2 * refit["bytes_after_first"]
    assert refit["golden_max_abs_error"] < 1e-4 and refit["unmatched_trained_keys"] == []
