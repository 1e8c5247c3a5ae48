"""Structured outputs: a JSON schema, any JSON object, a regex or a Lark grammar enforced token by
token while the router's own step loop decodes.

grammar.py turns a StructuredOutput into llguidance's grammar text, checking what the client
sent; compiler.py compiles it against a served model's tokenizer (off the event loop, within a
time limit, cached by the spec); masks.py gives the runner each constrained row's allowed-token
bitmask per step and advances its matcher by the sampled token. The native sampler applies the
masks (router._native.sample, masks/mask_rows), so constrained and free rows share one batch.

Library: llguidance, chosen by measurement on the 49,152-token SmolLM2 vocabulary (AMD EPYC,
2 cores; llguidance 1.9.1, xgrammar 0.2.9, outlines-core 0.2.14): llguidance compiles a JSON
schema, a regex or a Lark grammar in 0.6-2 ms under its own work limits, a mask costs 20-40 µs
median per step and consuming a token 3-4 µs; it is one Rust wheel with no dependency, built
straight from the HF `tokenizers` JSON, and refuses schema keywords it does not implement.
xgrammar's masks are faster (4 µs) but it imports torch and transformers (5.7 GB from PyPI) and
silently ignores `if`/`then`, `uniqueItems` and `not`; outlines-core takes 15.6 s to compile
"any JSON object", has no Lark grammars and raises on the end token.
"""
