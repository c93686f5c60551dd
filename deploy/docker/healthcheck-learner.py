#!/usr/bin/env python3
"""Container healthcheck of the learner: the standard gRPC health service says SERVING.

    healthcheck-learner.py [--address 127.0.0.1:8081] [--service pirl.v1.Learner] [--tls-ca CA]

By default it asks the plaintext health-only port (pirl-learner --health-address, PIRL_HEALTH_ADDRESS)
on loopback; with --tls-ca it can ask the TLS port instead (the health service is served there too).
Exit 0: SERVING; 1: anything else (NOT_SERVING, unreachable, timeout), with one line saying what.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def default_address() -> str:
    configured = os.environ.get("PIRL_HEALTH_ADDRESS", "0.0.0.0:8081")
    port = configured.rsplit(":", 1)[-1]
    return f"127.0.0.1:{port}"  # the check runs inside the container: loopback whatever was bound


def main() -> None:
    p = argparse.ArgumentParser(
        prog="healthcheck-learner.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--address", default=default_address(), help="host:port (default: loopback, PIRL_HEALTH_ADDRESS's port)"
    )
    p.add_argument("--service", default="pirl.v1.Learner", help="health service name to ask about ('' = the server)")
    p.add_argument("--tls-ca", help="speak TLS, trusting this CA (to check the learner's own port)")
    p.add_argument("--server-name", default="localhost", help="TLS name to expect in the certificate")
    p.add_argument("--timeout", type=float, default=5.0)
    args = p.parse_args()
    if args.tls_ca:
        if not os.path.isfile(args.tls_ca):
            print(f"error: --tls-ca: no such file {args.tls_ca}", file=sys.stderr)
            sys.exit(2)
        with open(args.tls_ca, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        channel = grpc.secure_channel(
            args.address, creds, options=[("grpc.ssl_target_name_override", args.server_name)]
        )
    else:
        channel = grpc.insecure_channel(args.address)
    try:
        with channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as e:
        print(f"unhealthy: {args.address}: {e.code().name} {e.details()}")
        sys.exit(1)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(f"{args.address} {args.service or '(server)'}: {status}")
    sys.exit(0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1)


if __name__ == "__main__":
    main()
