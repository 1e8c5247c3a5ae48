"""A remote KServe v2 (Open Inference Protocol) gRPC server as an engine: config, wire format,
engine, and the protocol's generated client stubs."""
