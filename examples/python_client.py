"""Stream a chat completion from an irouter server.

python examples/python_client.py --target 127.0.0.1:50051 "Tell me about Paris"
"""

from __future__ import annotations

import argparse
import sys

import grpc

from router.proto.irouter.v1 import inference_service_pb2 as pb
from router.proto.irouter.v1 import inference_service_pb2_grpc as pb_grpc


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("question")
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        request = pb.GenerateRequest(
            model=args.model,
            chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=args.question)]),
            sampling=pb.SamplingParams(max_tokens=args.max_tokens, temperature=0.0),
        )
        try:
            for chunk in stub.Generate(request, timeout=60):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                if chunk.finish_reason:
                    reason = pb.FinishReason.Name(chunk.finish_reason)
                    print(
                        f"\n[{reason}; {chunk.usage.prompt_tokens} prompt + "
                        f"{chunk.usage.completion_tokens} completion tokens]"
                    )
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
