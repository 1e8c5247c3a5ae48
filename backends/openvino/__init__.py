"""OpenVINO engines: the encoder (compiled model), the GenAI continuous-batching generator and
the IR cache they load from."""
