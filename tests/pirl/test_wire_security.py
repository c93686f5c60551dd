"""Wire codec (pirl.codec) and transport security (pirl.security), with a real TLS gRPC server on loopback."""

from __future__ import annotations

import datetime as dt
import json
import stat
import subprocess
import sys
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pirl import security
from pirl.codec import DTYPES, WireError, from_tensor_msg, sha256_hex, spec_msg, to_tensor_msg
from pirl.security import (
    TokenAuthenticator,
    auth_metadata,
    channel_credentials,
    check_bind_allowed,
    is_loopback,
    load_tokens,
    make_dev_pki,
    server_credentials,
)
from pirl.v1 import pirl_pb2, pirl_pb2_grpc

RPC_TIMEOUT = 10.0

# ============================================================================================== codec

SHAPES = [(), (0,), (5,), (3, 4), (2, 0, 3), (2, 3, 4)]


def _sample(dtype: str, shape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype.startswith("float"):
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_numpy_round_trip(dtype, shape):
    a = _sample(dtype, shape)
    msg = to_tensor_msg(a)
    assert msg.dtype == dtype and tuple(msg.shape) == shape
    assert len(msg.data) == a.size * a.itemsize
    wire = pirl_pb2.Tensor.FromString(msg.SerializeToString())  # through real protobuf bytes
    b = from_tensor_msg(wire, expect_dtype=dtype, expect_shape=shape, max_bytes=len(msg.data))
    assert b.dtype == np.dtype(dtype) and b.shape == shape
    np.testing.assert_array_equal(a, b)
    assert b.flags.writeable and b.flags.c_contiguous
    b[...] = 0  # a copy, not a view of the message bytes
    np.testing.assert_array_equal(from_tensor_msg(wire), a)


def test_bytes_are_little_endian_row_major():
    assert to_tensor_msg(np.array([1, 2], dtype=np.int32)).data == b"\x01\x00\x00\x00\x02\x00\x00\x00"
    big = np.array([1.5, -2.0], dtype=">f8")
    assert to_tensor_msg(big).data == np.array([1.5, -2.0], dtype="<f8").tobytes()
    a = np.arange(12, dtype=np.int64).reshape(3, 4)
    t = a.T  # non-contiguous input: bytes are of the row-major transposed array
    msg = to_tensor_msg(t)
    assert tuple(msg.shape) == (4, 3) and msg.data == np.ascontiguousarray(t).astype("<i8").tobytes()
    np.testing.assert_array_equal(from_tensor_msg(msg), t)
    assert to_tensor_msg(np.array([True, False])).data == b"\x01\x00"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool])
def test_torch_round_trip(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, generator=g) * 50).to(dtype)
    for t in (x, x.T, x[0, 0].clone(), x[:0]):  # contiguous, transposed, 0-d, empty
        msg = to_tensor_msg(t)
        assert msg.dtype == str(dtype).removeprefix("torch.") and tuple(msg.shape) == tuple(t.shape)
        np.testing.assert_array_equal(from_tensor_msg(msg), t.numpy())
    w = torch.randn(4, requires_grad=True)
    np.testing.assert_array_equal(from_tensor_msg(to_tensor_msg(w * 2)), (w * 2).detach().numpy())


def test_python_values_and_unsupported_dtypes():
    assert to_tensor_msg([1.0, 2.0]).dtype == "float64"
    assert to_tensor_msg(3).dtype == "int64" and tuple(to_tensor_msg(3).shape) == ()
    for bad in (
        np.zeros(2, np.float16),
        np.zeros(2, np.complex64),
        np.array(["a"]),
        np.array([object()]),
        torch.zeros(2, dtype=torch.bfloat16),
        torch.zeros(2, dtype=torch.float16),
        np.zeros(2, np.int16),
    ):
        with pytest.raises(WireError, match="dtype"):
            to_tensor_msg(bad)


def _msg(dtype="float32", shape=(2,), data=None):
    if data is None:
        data = b"\x00" * (int(np.prod(shape)) * DTYPES.get(dtype, np.dtype("u1")).itemsize)
    return pirl_pb2.Tensor(dtype=dtype, shape=list(shape), data=data)


@pytest.mark.parametrize(
    "msg, kwargs, match",
    [
        (_msg("float16"), {}, r"unknown dtype 'float16'"),
        (_msg("pickle"), {}, r"unknown dtype 'pickle'"),
        (_msg(""), {}, r"no dtype"),
        (pirl_pb2.Tensor(dtype="float32", shape=[2, -3], data=b""), {}, r"negative \(-3\)"),
        (_msg(data=b"\x00" * 7), {}, r"len\(data\) = 7 .* needs .* = 8"),
        (_msg(data=b"\x00" * 9), {}, r"len\(data\) = 9 .* = 8"),
        (_msg(shape=(), data=b""), {}, r"len\(data\) = 0 .* = 4"),
        (_msg("int64"), {"expect_dtype": "float32"}, r"dtype mismatch: got int64, expected float32"),
        (_msg("float32", (2,)), {"expect_dtype": np.float64}, r"got float32, expected float64"),
        (_msg(shape=(2, 3)), {"expect_shape": (3, 2)}, r"shape mismatch: got \(2, 3\), expected \(3, 2\)"),
        (_msg(shape=(6,)), {"expect_shape": (2, 3)}, r"got \(6,\), expected \(2, 3\)"),
        (_msg(shape=(2, 3)), {"expect_shape": (None, 4)}, r"expected \(\?, 4\)"),
        (_msg(shape=(64,)), {"max_bytes": 255}, r"too large: 256 bytes .*limit 255"),
        (_msg(shape=(10**12,), data=b""), {"max_bytes": 1 << 20}, r"too large: shape .* needs 4000000000000 bytes"),
        (_msg(shape=(2**62, 2**62), data=b""), {}, r"len\(data\) = 0"),  # no overflow, no allocation
        (_msg("bool", (3,), data=b"\x00\x01\x02"), {}, r"bool tensor holds bytes other than 0 and 1"),
        (_msg(shape=(1,) * 33, data=b"\x00" * 4), {}, r"33 dimensions"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_wire_errors(msg, kwargs, match):
    with pytest.raises(WireError, match=match):
        from_tensor_msg(msg, **kwargs)


def test_wire_error_is_value_error_and_wildcard_shapes():
    assert issubclass(WireError, ValueError)
    with pytest.raises(WireError, match="expected a pirl.v1.Tensor"):
        from_tensor_msg(b"\x00")
    with pytest.raises(WireError, match="unknown dtype"):
        from_tensor_msg(_msg(), expect_dtype="nope")
    a = from_tensor_msg(_msg(shape=(2, 3)), expect_shape=(None, 3))
    assert a.shape == (2, 3)


def test_spec_msg_and_sha256():
    s = spec_msg("float32", (3, 4))
    assert isinstance(s, pirl_pb2.TensorSpec) and s.dtype == "float32" and list(s.shape) == [3, 4]
    assert spec_msg(np.int64, []).dtype == "int64" and spec_msg(torch.bool, (5,)).dtype == "bool"
    assert spec_msg(np.dtype(np.uint8), np.array([2, 2]).tolist()).dtype == "uint8"
    with pytest.raises(WireError, match="unsupported dtype"):
        spec_msg(np.float16, (1,))
    with pytest.raises(WireError, match="negative"):
        spec_msg("float32", (2, -1))
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_hex(memoryview(b"")) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


# ============================================================================================== tokens


def _write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_load_tokens(tmp_path):
    assert load_tokens(_write_json(tmp_path / "t.json", {"robot-0": "abc", "robot-1": "xyz"})) == {
        "robot-0": "abc",
        "robot-1": "xyz",
    }
    with pytest.raises(FileNotFoundError, match="tokens file not found"):
        load_tokens(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_tokens(_write_json(tmp_path / "list.json", ["abc"]))
    (tmp_path / "bad.json").write_text("{robot")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_tokens(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="token of 'robot-1' is empty"):
        load_tokens(_write_json(tmp_path / "empty.json", {"robot-0": "a", "robot-1": ""}))
    with pytest.raises(ValueError, match="must be a string"):
        load_tokens(_write_json(tmp_path / "num.json", {"robot-0": 123}))
    with pytest.raises(ValueError, match="same token"):
        load_tokens(_write_json(tmp_path / "dup.json", {"robot-0": "same", "robot-1": "same"}))
    with pytest.raises(ValueError, match="lists no robots"):
        load_tokens(_write_json(tmp_path / "none.json", {}))


def test_authenticator_parsing():
    auth = TokenAuthenticator({"robot-0": "tok-0", "robot-1": "tok-1"})
    assert auth.authenticate(auth_metadata("tok-1")) == ("robot-1", "")
    assert auth.authenticate([("Authorization", "bearer   tok-0 ")])[0] == "robot-0"
    assert auth_metadata("tok-0") == (("authorization", "Bearer tok-0"),)
    for md, word in [
        (None, "missing"),
        ([], "missing"),
        ([("x-other", "Bearer tok-0")], "missing"),
        ([("authorization", "tok-0")], "invalid"),
        ([("authorization", "Basic tok-0")], "invalid"),
        ([("authorization", "Bearer ")], "invalid"),
        ([("authorization", "Bearer tok-2")], "invalid"),
        ([("authorization", "Bearer tok-0x")], "invalid"),
        ([("authorization", "Bearer " + "t" * 10**5)], "invalid"),
        (auth_metadata("tok-0") + auth_metadata("tok-1"), "invalid"),
    ]:
        robot, reason = auth.authenticate(md)
        assert robot is None and reason.startswith(word)
        assert "tok-" not in reason
    with pytest.raises(ValueError):
        TokenAuthenticator({})
    with pytest.raises(ValueError):
        auth_metadata("has space")


# ============================================================================================== PKI


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_dev_pki(tmp_path_factory.mktemp("pki"), ["robot-0", "robot-1"])


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory):
    return make_dev_pki(tmp_path_factory.mktemp("other"), ["robot-0"])


def test_dev_pki_files(pki):
    d = pki["dir"]
    expected = {
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "tokens.json",
        "client-robot-0.pem",
        "client-robot-0.key",
        "client-robot-1.pem",
        "client-robot-1.key",
    }
    assert {p.name for p in d.iterdir()} == expected
    for p in d.iterdir():
        mode = stat.S_IMODE(p.stat().st_mode)
        if p.suffix == ".key" or p.name == "tokens.json":
            assert mode == 0o600, p
        else:
            assert mode & 0o077 == 0o044, p
    tokens = load_tokens(pki["tokens"])
    assert set(tokens) == {"robot-0", "robot-1"} and len(set(tokens.values())) == 2
    assert all(len(t) >= 43 for t in tokens.values())

    ca = x509.load_pem_x509_certificate(pki["ca_cert"].read_bytes())
    server = x509.load_pem_x509_certificate(pki["server_cert"].read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    life = server.not_valid_after_utc - server.not_valid_before_utc
    assert dt.timedelta(days=364) < life < dt.timedelta(days=367)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert server.public_key().curve.name == "secp256r1"
    for rid in ("robot-0", "robot-1"):
        c = x509.load_pem_x509_certificate(pki["clients"][rid]["cert"].read_bytes())
        c.verify_directly_issued_by(ca)
        assert c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == rid
        assert ExtendedKeyUsageOID.CLIENT_AUTH in c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value


def test_dev_pki_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="robot id"):
        make_dev_pki(tmp_path / "a", ["../evil"])
    with pytest.raises(ValueError, match="more than once"):
        make_dev_pki(tmp_path / "b", ["r", "r"])
    with pytest.raises(ValueError, match="neither an IP address nor a DNS name"):
        make_dev_pki(tmp_path / "c", ["r"], hosts=["bad host"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        make_dev_pki(tmp_path / "file", ["r"])


def test_credentials_errors(tmp_path, pki):
    with pytest.raises(FileNotFoundError, match="TLS certificate not found"):
        server_credentials(tmp_path / "nope.pem", pki["server_key"])
    (tmp_path / "junk.pem").write_text("not a cert")
    with pytest.raises(ValueError, match="not a PEM certificate"):
        server_credentials(tmp_path / "junk.pem", pki["server_key"])
    with pytest.raises(ValueError, match="not a PEM private key"):
        server_credentials(pki["server_cert"], tmp_path / "junk.pem")
    with pytest.raises(ValueError, match="go together"):
        channel_credentials(pki["ca_cert"], client_cert_path=pki["clients"]["robot-0"]["cert"])


# ============================================================================================== real gRPC


class _Learner(pirl_pb2_grpc.LearnerServicer):
    """Register answers only after authentication, and tells the caller who it is (trailing metadata)."""

    def __init__(self, auth: TokenAuthenticator):
        self.auth = auth

    def Register(self, request, context):  # noqa: N802  the gRPC method name
        robot_id = self.auth.robot_for(context)
        context.set_trailing_metadata((("pirl-robot-id", robot_id),))
        return pirl_pb2.RegisterResponse(policy_version=42)


def _serve(pki, *, mutual: bool = False):
    auth = TokenAuthenticator(load_tokens(pki["tokens"]))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pirl_pb2_grpc.add_LearnerServicer_to_server(_Learner(auth), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    creds = server_credentials(pki["server_cert"], pki["server_key"], pki["ca_cert"] if mutual else None)
    port = server.add_secure_port("127.0.0.1:0", creds)
    assert port > 0
    server.start()
    return server, port


@pytest.fixture(scope="module")
def tls_server(pki):
    server, port = _serve(pki)
    yield port
    server.stop(None)


@pytest.fixture(scope="module")
def mtls_server(pki):
    server, port = _serve(pki, mutual=True)
    yield port
    server.stop(None)


def _register(target, creds, metadata=None, options=None):
    """(policy_version, robot_id) of a Register call, or raises grpc.RpcError."""
    with grpc.secure_channel(target, creds, options=options or []) as ch:
        resp, call = pirl_pb2_grpc.LearnerStub(ch).Register.with_call(
            pirl_pb2.RegisterRequest(robot_id="ignored"), metadata=metadata, timeout=RPC_TIMEOUT
        )
        return resp.policy_version, dict(call.trailing_metadata())["pirl-robot-id"]


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return ei.value.code(), ei.value.details()


def test_tls_token_auth(pki, tls_server):
    tokens = load_tokens(pki["tokens"])
    creds = channel_credentials(pki["ca_cert"])
    target = f"127.0.0.1:{tls_server}"  # the server cert has IP SAN 127.0.0.1: no target name override needed
    for rid in ("robot-0", "robot-1"):
        assert _register(target, creds, auth_metadata(tokens[rid])) == (42, rid)
    assert _register(f"localhost:{tls_server}", creds, auth_metadata(tokens["robot-0"])) == (42, "robot-0")

    code, details = _code(lambda: _register(target, creds, auth_metadata("not-" + tokens["robot-0"])))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "invalid token" in details and tokens["robot-0"] not in details
    code, details = _code(lambda: _register(target, creds))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "missing token" in details
    code, details = _code(lambda: _register(target, creds, (("authorization", tokens["robot-0"]),)))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in details

    # the health service answers over the same TLS port; the server kept serving after the refusals
    with grpc.secure_channel(target, creds) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert _register(target, creds, auth_metadata(tokens["robot-1"])) == (42, "robot-1")


def test_tls_refuses_untrusted_and_plaintext_clients(pki, other_pki, tls_server):
    token = auth_metadata(load_tokens(pki["tokens"])["robot-0"])
    target = f"127.0.0.1:{tls_server}"
    # a client trusting another CA does not accept the learner's certificate
    code, _ = _code(lambda: _register(target, channel_credentials(other_pki["ca_cert"]), token))
    assert code == grpc.StatusCode.UNAVAILABLE

    def plaintext():
        with grpc.insecure_channel(target) as ch:
            pirl_pb2_grpc.LearnerStub(ch).Register(pirl_pb2.RegisterRequest(), metadata=token, timeout=RPC_TIMEOUT)

    assert _code(plaintext)[0] == grpc.StatusCode.UNAVAILABLE


def test_tls_host_name_must_match(tmp_path):
    pki = make_dev_pki(tmp_path, ["robot-0"], hosts=["learner.example.internal"])
    server, port = _serve(pki)
    try:
        token = auth_metadata(load_tokens(pki["tokens"])["robot-0"])
        creds = channel_credentials(pki["ca_cert"])
        code, _ = _code(lambda: _register(f"127.0.0.1:{port}", creds, token))
        assert code == grpc.StatusCode.UNAVAILABLE  # cert is not for 127.0.0.1
        override = [("grpc.ssl_target_name_override", "learner.example.internal")]
        assert _register(f"127.0.0.1:{port}", creds, token, options=override) == (42, "robot-0")
    finally:
        server.stop(None)


def test_mutual_tls(pki, other_pki, mtls_server):
    tokens = load_tokens(pki["tokens"])
    target = f"127.0.0.1:{mtls_server}"
    client = pki["clients"]["robot-1"]
    creds = channel_credentials(pki["ca_cert"], client["cert"], client["key"])
    assert _register(target, creds, auth_metadata(tokens["robot-1"])) == (42, "robot-1")
    # the token still decides who the caller is, and is still required
    assert _code(lambda: _register(target, creds))[0] == grpc.StatusCode.UNAUTHENTICATED
    # no client certificate, or one from another CA: the handshake fails
    code, _ = _code(lambda: _register(target, channel_credentials(pki["ca_cert"]), auth_metadata(tokens["robot-1"])))
    assert code == grpc.StatusCode.UNAVAILABLE
    foreign = other_pki["clients"]["robot-0"]
    code, _ = _code(
        lambda: _register(
            target,
            channel_credentials(pki["ca_cert"], foreign["cert"], foreign["key"]),
            auth_metadata(tokens["robot-0"]),
        )
    )
    assert code == grpc.StatusCode.UNAVAILABLE


# ============================================================================================== binding


@pytest.mark.parametrize(
    "address, loopback",
    [
        ("127.0.0.1:50051", True),
        ("127.1.2.3:0", True),
        ("localhost:50051", True),
        ("LOCALHOST:1", True),
        ("[::1]:50051", True),
        ("::1", True),
        ("[::ffff:127.0.0.1]:5", True),
        ("unix:/tmp/pirl.sock", True),
        ("ipv4:127.0.0.1:50051", True),
        ("127.0.0.1", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        (":50051", False),
        ("10.0.0.5:50051", False),
        ("learner.example.com:443", False),
        ("localhost.evil.com:1", False),
        ("[2001:db8::1]:50051", False),
        ("192.168.1.2", False),
    ],
)
def test_is_loopback(address, loopback):
    assert is_loopback(address) is loopback


def test_check_bind_allowed():
    check_bind_allowed("127.0.0.1:50051", tls=False, insecure=False)
    check_bind_allowed("[::1]:0", tls=False, insecure=False)
    check_bind_allowed("0.0.0.0:50051", tls=True, insecure=False)
    check_bind_allowed("0.0.0.0:50051", tls=False, insecure=True)
    with pytest.raises(ValueError, match=r"0\.0\.0\.0:50051 without TLS.*server.tls_cert.*server.insecure"):
        check_bind_allowed("0.0.0.0:50051", tls=False, insecure=False)
    with pytest.raises(ValueError, match="server.insecure"):
        check_bind_allowed("[::]:1", tls=False, insecure=False)


# ============================================================================================== pirl-certs


def test_pirl_certs_main(tmp_path, capsys):
    out = tmp_path / "certs"
    assert (
        security.main(
            ["--out", str(out), "--robots", "robot-0", "robot-1", "--hosts", "localhost", "127.0.0.1", "learner.local"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    for name in ("ca.pem", "server.key", "client-robot-1.pem", "tokens.json"):
        assert name in printed and (out / name).is_file()
    tokens = load_tokens(out / "tokens.json")
    assert not any(t in printed for t in tokens.values())  # never print secrets

    assert security.main(["--out", str(out), "--robots", "robot-0"]) == 2  # non-empty DIR without --force
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--force" in err
    assert load_tokens(out / "tokens.json") == tokens  # untouched

    assert security.main(["--out", str(out), "--robots", "robot-0", "--force"]) == 0
    assert load_tokens(out / "tokens.json")["robot-0"] != tokens["robot-0"]

    assert security.main(["--out", str(tmp_path / "x"), "--robots", "bad/id"]) == 2
    assert "robot id" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert security.main(["--out", str(tmp_path / "f"), "--robots", "r"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_pirl_certs_subprocess(tmp_path):
    out = tmp_path / "c"
    r = subprocess.run(
        [sys.executable, "-m", "pirl.security", "--out", str(out), "--robots", "robot-7"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "client-robot-7.pem" in r.stdout and set(load_tokens(out / "tokens.json")) == {"robot-7"}
    r = subprocess.run(
        [sys.executable, "-m", "pirl.security", "--out", str(out)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "--robots" in r.stderr
