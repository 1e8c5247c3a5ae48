"""Load-test harness for irouter: closed-loop, open-loop (Poisson) and sweep scenarios against the
gRPC InferenceService/RetrievalService or the OpenAI REST proxy, from one or several client
processes, reported as vLLM `bench serve`-style metrics (JSON, terminal table, HTML with plots).

    irouter loadtest run --target grpc://127.0.0.1:50051 --concurrency 8 --duration 30
    irouter loadtest compare before.json after.json
"""

from __future__ import annotations
