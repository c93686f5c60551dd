"""Authentication and transport security for the PI-RL wire (per-robot tokens, TLS, dev PKI).

* Tokens: every RPC carries ``authorization: Bearer <token>`` metadata; the learner maps the token to a
  robot id with :class:`TokenAuthenticator` (constant-time comparisons) or refuses the call with
  ``UNAUTHENTICATED``. The tokens file is JSON ``{"robot-0": "<token>", ...}`` (:func:`load_tokens`).
* TLS: :func:`server_credentials` / :func:`channel_credentials` build grpc credentials from PEM files,
  with mutual TLS when the server is given a client CA.
* :func:`make_dev_pki` (console script ``pirl-certs``) writes a local CA, a server certificate, one client
  certificate per robot and a tokens file, for development and small fleets.
* :func:`check_bind_allowed`: plaintext only on loopback unless explicitly allowed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

__all__ = [
    "AUTH_METADATA_KEY",
    "TokenAuthenticator",
    "auth_metadata",
    "channel_credentials",
    "check_bind_allowed",
    "is_loopback",
    "load_tokens",
    "main",
    "make_dev_pki",
    "server_credentials",
]

AUTH_METADATA_KEY = "authorization"
_BEARER = "bearer"
_MAX_TOKEN_CHARS = 4096
_ROBOT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DNS_NAME_RE = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?$")


# ----------------------------------------------------------------------------------------------- tokens


def _check_token(robot_id: str, token: object, where: str) -> str:
    if not isinstance(token, str):
        raise ValueError(f"{where}: token of {robot_id!r} must be a string, got {type(token).__name__}")
    if not token.strip():
        raise ValueError(f"{where}: token of {robot_id!r} is empty")
    if token != token.strip() or any(c.isspace() for c in token) or not token.isprintable():
        raise ValueError(f"{where}: token of {robot_id!r} contains whitespace or control characters")
    if len(token) > _MAX_TOKEN_CHARS:
        raise ValueError(f"{where}: token of {robot_id!r} is longer than {_MAX_TOKEN_CHARS} characters")
    return token


def _check_tokens(tokens: Mapping[str, str], where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for robot_id, token in tokens.items():
        if not isinstance(robot_id, str) or not robot_id.strip():
            raise ValueError(f"{where}: robot ids must be non-empty strings, got {robot_id!r}")
        _check_token(robot_id, token, where)
        if token in seen:  # a shared token could not tell the robots apart
            raise ValueError(f"{where}: robots {seen[token]!r} and {robot_id!r} have the same token")
        seen[token] = robot_id
        out[robot_id] = token
    return out


def load_tokens(path: str | os.PathLike) -> dict[str, str]:
    """Read a tokens file: a JSON object ``{robot_id: token}`` with non-empty, distinct tokens.

    Raises FileNotFoundError for a missing file and ValueError (naming the file) for bad content.
    Warns when the file is readable by group or others.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"tokens file not found: {p}" if not p.exists() else f"tokens file is not a file: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read tokens file {p}: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"tokens file {p} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f'tokens file {p} must hold a JSON object {{"robot-id": "token", ...}}, got {type(data).__name__}'
        )
    if not data:
        raise ValueError(f"tokens file {p} lists no robots")
    tokens = _check_tokens(data, f"tokens file {p}")
    try:
        if os.name == "posix" and p.stat().st_mode & 0o077:
            log.warning(
                "tokens file %s is readable by group/others (mode %o): chmod 600 it", p, p.stat().st_mode & 0o777
            )
    except OSError:
        pass
    return tokens


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token`` (pass as ``metadata=`` to a stub call)."""
    _check_token("this robot", token, "auth_metadata")
    return ((AUTH_METADATA_KEY, f"Bearer {token}"),)


def _digest(token: str) -> bytes:
    # comparing fixed-length digests keeps compare_digest constant-time even for wrong-length tokens
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenAuthenticator:
    """Maps the bearer token of a call to its robot id, or aborts the call with UNAUTHENTICATED."""

    def __init__(self, tokens: Mapping[str, str]):
        tokens = _check_tokens(dict(tokens), "TokenAuthenticator")
        if not tokens:
            raise ValueError("TokenAuthenticator: no robot tokens given")
        self._entries = [(robot_id, _digest(token)) for robot_id, token in tokens.items()]

    @property
    def robot_ids(self) -> list[str]:
        return [robot_id for robot_id, _ in self._entries]

    def _match(self, token: str) -> str | None:
        presented = _digest(token)
        found = None
        for robot_id, digest in self._entries:  # no early exit: the timing does not tell which one matched
            if hmac.compare_digest(presented, digest):
                found = robot_id
        return found

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[str | None, str]:
        """``(robot_id, "")`` for valid metadata, else ``(None, reason)``; never raises, never echoes the token."""
        values = [v for k, v in (metadata or ()) if k.lower() == AUTH_METADATA_KEY]
        if not values:
            return None, (
                "missing token: send 'authorization: Bearer <token>' metadata "
                "(the robot's entry in the learner's tokens file)"
            )
        if len(values) > 1:
            return None, "invalid token: more than one authorization metadata entry"
        value = values[0]
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                return None, "invalid token: authorization metadata is not UTF-8"
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != _BEARER or not token:
            return None, "invalid token: authorization metadata must be 'Bearer <token>'"
        if len(token) > _MAX_TOKEN_CHARS:
            return None, "invalid token"
        robot_id = self._match(token)
        if robot_id is None:
            return None, "invalid token: not the token of any robot this learner knows"
        return robot_id, ""

    def robot_for(self, context) -> str:
        """The robot id of the call's token; otherwise ``context.abort(UNAUTHENTICATED, reason)``."""
        robot_id, reason = self.authenticate(context.invocation_metadata())
        if robot_id is not None:
            return robot_id
        peer = getattr(context, "peer", None)
        log.warning("refused call from %s: %s", peer() if callable(peer) else "?", reason.split(":")[0])
        context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
        raise PermissionError(reason)  # only reached with a context whose abort() returns (test doubles)


# ----------------------------------------------------------------------------------------------- TLS


def _read_pem(path: str | os.PathLike, what: str, marker: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    data = p.read_bytes()
    if f"-----BEGIN {marker}".encode() not in data and not (marker == "PRIVATE KEY" and b"PRIVATE KEY-----" in data):
        raise ValueError(f"{what} {p} is not a PEM {marker.lower()}")
    return data


def server_credentials(
    cert_pem_path: str | os.PathLike, key_pem_path: str | os.PathLike, client_ca_path: str | os.PathLike | None = None
) -> grpc.ServerCredentials:
    """TLS server credentials; with ``client_ca_path`` clients must present a certificate signed by that CA."""
    cert = _read_pem(cert_pem_path, "TLS certificate", "CERTIFICATE")
    key = _read_pem(key_pem_path, "TLS private key", "PRIVATE KEY")
    if client_ca_path is None:
        return grpc.ssl_server_credentials([(key, cert)])
    ca = _read_pem(client_ca_path, "client CA certificate", "CERTIFICATE")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(
    ca_path: str | os.PathLike | None,
    client_cert_path: str | os.PathLike | None = None,
    client_key_path: str | os.PathLike | None = None,
) -> grpc.ChannelCredentials:
    """TLS channel credentials trusting ``ca_path`` (None: the system roots), plus a client cert for mutual TLS."""
    if (client_cert_path is None) != (client_key_path is None):
        raise ValueError("a client certificate and its private key go together (give both or neither)")
    ca = _read_pem(ca_path, "CA certificate", "CERTIFICATE") if ca_path is not None else None
    cert = _read_pem(client_cert_path, "client certificate", "CERTIFICATE") if client_cert_path else None
    key = _read_pem(client_key_path, "client private key", "PRIVATE KEY") if client_key_path else None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


# ----------------------------------------------------------------------------------------------- binding


def _split_host(address: str) -> str:
    a = address.strip()
    for prefix in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if a.startswith(prefix):
            a = a[len(prefix) :]
            break
    if a.startswith("["):
        end = a.find("]")
        return a[1:end] if end > 0 else a
    if a.count(":") > 1:  # bare IPv6, with or without a trailing port
        try:
            ipaddress.ip_address(a)
            return a
        except ValueError:
            return a.rsplit(":", 1)[0]
    return a.split(":", 1)[0]


def is_loopback(address: str) -> bool:
    """Whether ``address`` ("host:port", "[v6]:port", "unix:path") only accepts local connections.

    True for 127.0.0.0/8, ::1 (also IPv4-mapped), ``localhost`` and unix sockets. No DNS lookups: any other
    name, an empty host (":50051") and wildcard addresses (0.0.0.0, [::]) are not loopback.
    """
    a = address.strip()
    if a.startswith(("unix:", "unix-abstract:")):
        return True
    host = _split_host(a).rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def check_bind_allowed(address: str, tls: bool, insecure: bool) -> None:
    """Refuse (ValueError) to serve plaintext on a non-loopback address unless ``insecure`` is set."""
    if tls or is_loopback(address):
        return
    if insecure:
        log.warning(
            "serving PLAINTEXT on non-loopback address %s (server.insecure): tokens and rollouts travel unencrypted",
            address,
        )
        return
    raise ValueError(
        f"refusing to listen on non-loopback address {address} without TLS: set server.tls_cert and "
        "server.tls_key (make them with pirl-certs), listen on 127.0.0.1, or set server.insecure=true to "
        "allow plaintext"
    )


# ----------------------------------------------------------------------------------------------- dev PKI


def _write(path: Path, data: bytes, private: bool) -> None:
    mode = 0o600 if private else 0o644
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # umask cannot widen or narrow it
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _parse_hosts(hosts: Sequence[str]):
    from cryptography import x509

    names = []
    for h in hosts:
        h = h.strip()
        bare = h[1:-1] if h.startswith("[") and h.endswith("]") else h
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(bare)))
            continue
        except ValueError:
            pass
        if not _DNS_NAME_RE.match(h) or len(h) > 253:
            raise ValueError(f"host {h!r} is neither an IP address nor a DNS name")
        names.append(x509.DNSName(h.rstrip(".")))
    if not names:
        raise ValueError("give at least one host name or IP address for the server certificate")
    return names


def make_dev_pki(
    out_dir: str | os.PathLike,
    robot_ids: Sequence[str],
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    *,
    days: int = 365,
) -> dict:
    """Write a development PKI and robot tokens into ``out_dir`` (created; existing files are overwritten).

    Files: ``ca.pem``/``ca.key`` (a local CA), ``server.pem``/``server.key`` (for ``hosts``, as DNS and IP
    SubjectAltNames), ``client-<robot>.pem``/``.key`` (CN=robot id, for mutual TLS) and ``tokens.json``
    (``secrets.token_urlsafe(32)`` per robot). ECDSA P-256 keys, SHA-256 signatures, valid ``days`` days.
    Private keys and tokens.json are mode 0600.

    Returns ``{"dir", "ca_cert", "ca_key", "server_cert", "server_key", "tokens": Path,
    "clients": {robot_id: {"cert": Path, "key": Path}}}``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    robot_ids = list(robot_ids)
    if not robot_ids:
        raise ValueError("give at least one robot id")
    for rid in robot_ids:
        if not isinstance(rid, str) or not _ROBOT_ID_RE.match(rid):
            raise ValueError(
                f"robot id {rid!r} must be 1-128 characters of letters, digits, '.', '_', '-' "
                "(starting with a letter or digit)"
            )
    dupes = sorted({r for r in robot_ids if robot_ids.count(r) > 1})
    if dupes:
        raise ValueError(f"robot ids given more than once: {', '.join(dupes)}")
    san = _parse_hosts(list(hosts))
    if days < 1:
        raise ValueError("days must be >= 1")

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    if not out.exists():
        out.mkdir(parents=True, mode=0o700)

    now = _dt.datetime.now(_dt.UTC)
    not_before, not_after = now - _dt.timedelta(minutes=5), now + _dt.timedelta(days=days)

    def new_key():
        return ec.generate_private_key(ec.SECP256R1())

    def key_pem(k) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def name(cn: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PI-RL dev PKI"),
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
            ]
        )

    ca_key = new_key()
    ca_name = name("PI-RL dev CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)

    def leaf(cn: str, eku, alt_names):
        k = new_key()
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_name)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(k.public_key()), critical=False)
            .add_extension(aki, critical=False)
        )
        if alt_names:
            b = b.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        return b.sign(ca_key, hashes.SHA256()), k

    def cert_pem(c) -> bytes:
        return c.public_bytes(serialization.Encoding.PEM)

    paths: dict = {
        "dir": out,
        "ca_cert": out / "ca.pem",
        "ca_key": out / "ca.key",
        "server_cert": out / "server.pem",
        "server_key": out / "server.key",
        "tokens": out / "tokens.json",
        "clients": {},
    }
    _write(paths["ca_key"], key_pem(ca_key), private=True)
    _write(paths["ca_cert"], cert_pem(ca_cert), private=False)

    server_cn = str(hosts[0]).strip().strip("[]")
    if len(server_cn) > 64:  # the CommonName attribute's limit; the SubjectAltNames are what clients check
        server_cn = "PI-RL learner"
    server_cert, server_key = leaf(server_cn, ExtendedKeyUsageOID.SERVER_AUTH, san)
    _write(paths["server_key"], key_pem(server_key), private=True)
    _write(paths["server_cert"], cert_pem(server_cert) + cert_pem(ca_cert), private=False)  # full chain

    tokens = {}
    for rid in robot_ids:
        c, k = leaf(rid, ExtendedKeyUsageOID.CLIENT_AUTH, [])
        entry = {"cert": out / f"client-{rid}.pem", "key": out / f"client-{rid}.key"}
        _write(entry["key"], key_pem(k), private=True)
        _write(entry["cert"], cert_pem(c) + cert_pem(ca_cert), private=False)
        paths["clients"][rid] = entry
        tokens[rid] = secrets.token_urlsafe(32)
    _write(paths["tokens"], (json.dumps(tokens, indent=2) + "\n").encode(), private=True)
    return paths


# ----------------------------------------------------------------------------------------------- CLI


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pirl-certs",
        description="Write a development PKI (CA, learner server certificate, one client certificate per robot "
        "for mutual TLS) and a tokens file with a random token per robot.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write into (created)")
    p.add_argument("--robots", required=True, nargs="+", metavar="ROBOT_ID", help="robot ids, e.g. robot-0 robot-1")
    p.add_argument(
        "--hosts",
        nargs="+",
        default=["localhost", "127.0.0.1"],
        metavar="HOST",
        help="DNS names / IP addresses the learner is reached at (default: localhost 127.0.0.1)",
    )
    p.add_argument("--days", type=int, default=365, help="validity in days (default: 365)")
    p.add_argument("--force", action="store_true", help="overwrite files in an existing non-empty DIR")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``pirl-certs --out DIR --robots robot-0 robot-1 [--hosts localhost 127.0.0.1] [--force]``."""
    args = _build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()) and not args.force:
            raise ValueError(f"{out} is not empty: pass --force to overwrite the files in it, or pick a new --out")
        paths = make_dev_pki(out, args.robots, args.hosts, days=args.days)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    until = (_dt.datetime.now(_dt.UTC) + _dt.timedelta(days=args.days)).date().isoformat()
    rows = [
        (paths["ca_cert"], "CA certificate: every robot trusts the learner through it"),
        (paths["ca_key"], "CA private key (0600): keep it off robots and out of images"),
        (paths["server_cert"], f"learner certificate for {', '.join(args.hosts)}"),
        (paths["server_key"], "learner private key (0600)"),
    ]
    for rid, entry in paths["clients"].items():
        rows.append((entry["cert"], f"client certificate of {rid} (CN={rid}, for mutual TLS)"))
        rows.append((entry["key"], f"client private key of {rid} (0600)"))
    rows.append((paths["tokens"], "tokens (0600): the learner's --tokens file; give each robot only its own token"))
    print(f"wrote a dev PKI for {len(args.robots)} robot(s) to {out} (valid until {until}):")
    width = max(len(str(p)) for p, _ in rows)
    for p, what in rows:
        print(f"  {str(p):<{width}}  {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
