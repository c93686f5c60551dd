"""The committed generated code matches the .proto (regenerate with `make proto`)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_current(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{ROOT / 'proto'}",
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        str(ROOT / "proto/pirl/v1/pirl.proto"),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    for name in ("pirl_pb2.py", "pirl_pb2.pyi", "pirl_pb2_grpc.py"):
        fresh = (tmp_path / "pirl/v1" / name).read_text()
        committed = (ROOT / "pirl/v1" / name).read_text()
        assert fresh == committed, f"pirl/v1/{name} is stale: run `make proto`"
