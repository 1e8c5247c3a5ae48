// Stream a chat completion from an irouter server with @grpc/grpc-js, loading the .proto files.
//   node examples/node_client.js 127.0.0.1:50051 "Tell me about Paris"
"use strict";
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const target = process.argv[2] || "127.0.0.1:50051";
const question = process.argv[3] || "What is the capital of France?";
const maxTokens = Number(process.argv[4] || 32);

const definition = protoLoader.loadSync("irouter/v1/inference_service.proto", {
  // google/api/annotations.proto (the REST mapping) comes from build/proto-deps (`make install`).
  includeDirs: [path.join(__dirname, "..", "protos"), path.join(__dirname, "..", "build", "proto-deps")],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const irouter = grpc.loadPackageDefinition(definition).irouter.v1;
const client = new irouter.InferenceService(target, grpc.credentials.createInsecure());

const call = client.Generate(
  {
    model: "smollm2-135m-instruct",
    chat: { messages: [{ role: "user", content: question }] },
    sampling: { max_tokens: maxTokens, temperature: 0 },
  },
  { deadline: Date.now() + 60000 },
);
call.on("data", (chunk) => {
  process.stdout.write(chunk.text);
  if (chunk.finish_reason !== "FINISH_REASON_UNSPECIFIED") {
    process.stdout.write(
      `\n[${chunk.finish_reason}; ${chunk.usage.prompt_tokens} prompt + ${chunk.usage.completion_tokens} completion tokens]\n`,
    );
  }
});
call.on("error", (err) => {
  console.error(`error: ${grpc.status[err.code]}: ${err.details}`);
  process.exit(1);
});
call.on("end", () => client.close());
