#!/usr/bin/env python3
"""A client of instinferd written against the .proto alone, with the stock Python gRPC stack.

Stubs are generated at run time by grpcio-tools from proto/instinfer/v1/inference.proto; the
health check uses grpcio-health-checking and grpcio-reflection reads the service's schema from
the server, as grpcurl does. The script streams one generation, runs the health check, reads
GetModelInfo and the reflected service, then prints one JSON object with what it saw.

Usage: grpc_client.py --addr HOST:PORT --proto-root DIR --prompt TEXT --max-tokens N
"""

import argparse
import importlib
import json
import sys
import tempfile

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_tools import protoc


def generate_stubs(proto_root: str):
    out = tempfile.mkdtemp(prefix="instinfer-stubs-")
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "instinfer/v1/inference.proto",
        ]
    )
    if rc != 0:
        sys.exit(f"grpc_tools.protoc failed with code {rc}")
    sys.path.insert(0, out)
    pb = importlib.import_module("instinfer.v1.inference_pb2")
    rpc = importlib.import_module("instinfer.v1.inference_pb2_grpc")
    return pb, rpc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--proto-root", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-tokens", type=int, required=True)
    args = ap.parse_args()

    pb, rpc = generate_stubs(args.proto_root)
    channel = grpc.insecure_channel(args.addr)
    grpc.channel_ready_future(channel).result(timeout=30)

    health = health_pb2_grpc.HealthStub(channel)
    statuses = {
        name: health_pb2.HealthCheckResponse.ServingStatus.Name(
            health.Check(health_pb2.HealthCheckRequest(service=name), timeout=30).status
        )
        for name in ["", "instinfer.v1.Inference"]
    }

    reflected = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = reflected.FindServiceByName("instinfer.v1.Inference")
    reflected_methods = sorted(m.name for m in service.methods)

    stub = rpc.InferenceStub(channel)
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)

    request = pb.GenerateRequest(
        text=args.prompt, max_tokens=args.max_tokens, request_id="python-client"
    )
    ids, text, finished, request_ids = [], "", None, set()
    for msg in stub.Generate(request, timeout=300):
        request_ids.add(msg.request_id)
        kind = msg.WhichOneof("event")
        if kind == "token":
            ids.append(msg.token.id)
            text += msg.token.text
        elif kind == "finished":
            finished = msg.finished
            text += finished.text
    if finished is None:
        sys.exit("the stream ended without a finished message")

    stats = stub.GetStats(pb.GetStatsRequest(), timeout=30)
    print(
        json.dumps(
            {
                "health": statuses,
                "reflected_methods": reflected_methods,
                "model": {
                    "architecture": info.architecture,
                    "layers": info.layers,
                    "context_length": info.context_length,
                    "kv_bytes_per_token": info.kv_bytes_per_token,
                    "quantization": info.quantization,
                },
                "ids": ids,
                "text": text,
                "request_ids": sorted(request_ids),
                "finish_reason": pb.FinishReason.Name(finished.reason),
                "generated_tokens": finished.usage.generated_tokens,
                "prompt_tokens": finished.usage.prompt_tokens,
                "requests_length": stats.requests_length,
            }
        )
    )


if __name__ == "__main__":
    main()
