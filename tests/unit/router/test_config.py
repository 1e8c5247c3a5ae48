from __future__ import annotations

import re
from pathlib import Path

import pytest

from router.config import ConfigError
from router.config_file import load_config


def test_built_in_default_serves_both_models_without_a_file() -> None:
    config = load_config(env={})
    kinds = {m.name: m.kind for m in config.models}
    assert kinds == {"smollm2-135m-instruct": "generate", "all-minilm-l6-v2": "embed"}
    assert config.server.port == 50051


def test_yaml_then_env_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(
        "server: {port: 6000, grace_seconds: 3}\n"
        "models:\n  - {name: tiny, kind: generate, artifact: smollm2-135m-instruct, max_slots: 4}\n"
    )
    config = load_config(path, env={"IROUTER_PORT": "7000", "IROUTER_HOST": "0.0.0.0"})
    assert (config.server.port, config.server.host, config.server.grace_seconds) == (
        7000,
        "0.0.0.0",
        3.0,
    )
    assert [(m.name, m.max_slots) for m in config.models] == [("tiny", 4)]
    flagged = load_config(
        path, env={"IROUTER_PORT": "7000"}, overrides={"port": 8000, "host": None}
    )
    assert flagged.server.port == 8000


def test_an_embedding_models_small_window_needs_no_generation_settings(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(
        "models:\n  - {name: e, kind: embed, artifact: all-minilm-l6-v2, max_context: 64}\n"
        "  - {name: g, kind: generate, artifact: smollm2-135m-instruct, max_context: 64}\n"
    )
    # default_max_tokens (256) applies to the generation model only.
    with pytest.raises(ConfigError, match=r"models\['g'\]\.default_max_tokens=256"):
        load_config(path, env={})


def test_openvino_model_config(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "models: [{name: g, kind: generate, artifact: x, backend: openvino,"
        " device: 'HETERO:GPU,CPU', precision: f32}]\n"
    )
    (model,) = load_config(path, env={}).models
    assert (model.backend, model.device, model.precision) == ("openvino", "HETERO:GPU,CPU", "f32")


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server: {metrics_port: 0}\n")
    assert load_config(env={"IROUTER_CONFIG": str(path)}).server.metrics_port == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server: {port: 70000}", "server.port=70000"),
        ("server: {prot: 1}", "unknown keys ['prot']"),
        ("server: {port: '1'}", "server.port='1' must be int"),
        ("models: [{name: a, kind: chat, artifact: x}]", "kind='chat' is unknown"),
        (
            "models: [{name: a, kind: generate, artifact: x, backend: tgi}]",
            "backend='tgi' is unknown",
        ),
        ("models: [{name: a, kind: generate}]", "artifact"),
        (
            "models: [{name: a, kind: embed, artifact: x}, {name: a, kind: embed, artifact: y}]",
            "duplicate names ['a']",
        ),
        ("models: [{name: a, kind: generate, artifact: x, max_slots: 0}]", "max_slots=0"),
        (
            "models: [{name: a, kind: generate, artifact: x, backend: openvino, precision: fp8}]",
            "models['a'].precision='fp8' is unknown",
        ),
        (
            "models: [{name: a, kind: embed, artifact: x, backend: openvino, device: ''}]",
            "models['a'].device is empty",
        ),
        (
            "models: [{name: a, kind: embed, artifact: x, device: GPU}]",
            "models['a'].device='GPU' / precision='': these apply to backend 'openvino'",
        ),
        (
            "models: [{name: a, kind: generate, artifact: x, prefill_graph: int7}]",
            "models['a'].prefill_graph='int7': use one of ['auto', 'int8', 'model', 'native']",
        ),
        (
            "models: [{name: a, kind: generate, artifact: x, backend: openvino,"
            " prefill_graph: int8}]",
            "prefill_graph='int8': use one of ['auto', 'int8', 'model', 'native'], for generation "
            "models on backend 'onnxruntime' only",
        ),
        (
            "models: [{name: a, kind: embed, artifact: x, prefill_graph: model}]",
            "models['a'].prefill_graph='model': use one of ['auto', 'int8', 'model', 'native'], "
            "for generation models",
        ),
        (
            "models: [{name: a, kind: generate, artifact: x, decode_kernel: gpu}]",
            "models['a'].decode_kernel='gpu': use one of ['auto', 'native', 'onnxruntime', "
            "'avx2', 'avx512-vnni', 'amx-int8']",
        ),
        (
            "models: [{name: a, kind: embed, artifact: x, decode_kernel: native}]",
            "models['a'].decode_kernel='native': use one of ['auto', 'native', 'onnxruntime', "
            "'avx2', 'avx512-vnni', 'amx-int8'], "
            "for generation models",
        ),
        ("colour: blue", "unknown keys ['colour']"),
        ("server: [1, 2]", "server must be a mapping"),
        ("server: {port: 1", "not valid YAML"),
        ("cache: {response: {max_bytes: 0}}", "cache.response.max_bytes=0"),
        ("cache: {semantic: {enabled: true, embedding_model: e5}}", "embedding_model='e5'"),
        ("cache: {semantic: {threshold: 2}}", "threshold=2"),
        ("retrieval: {rag: {template: 'no placeholders'}}", "must contain {passages}"),
        (
            "models: [{name: a, kind: generate, artifact: x, backend: kserve_grpc}]",
            "models['a'] has backend 'kserve_grpc' and no kserve: section",
        ),
        (
            "models: [{name: a, kind: generate, artifact: x, backend: kserve_grpc,"
            " kserve: {url: 'http://h/v2', model: m}}]",
            "models[0].kserve: url='http://h/v2' must be 'host:port'",
        ),
        (
            "models: [{name: a, kind: embed, artifact: x, backend: kserve_grpc,"
            " kserve: {url: 'h:1', model: m}}]",
            "backend 'kserve_grpc' serves generation models only",
        ),
    ],
)
def test_bad_config_names_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as info:
        load_config(path, env={})
    assert message in str(info.value)


def test_bad_environment_value_is_named() -> None:
    with pytest.raises(ConfigError, match="IROUTER_PORT='http'"):
        load_config(env={"IROUTER_PORT": "http"})


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml", env={})


def test_nested_tls_section_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "tls.yaml"
    path.write_text("server: {tls: {cert: /nope.pem}}\n")
    with pytest.raises(ConfigError, match="needs both cert and key"):
        load_config(path, env={})
    path.write_text("server: {tls: {cert: /nope.pem, key: /nope.key}}\n")
    with pytest.raises(
        ConfigError, match=re.escape("server.tls.cert='/nope.pem' is not a readable file")
    ):
        load_config(path, env={})
    path.write_text("server: {tls: {cert: 1}}\n")
    with pytest.raises(ConfigError, match=re.escape("server.tls.cert=1 must be str")):
        load_config(path, env={})


def test_config_with_every_section_survives_pickling_for_workers() -> None:
    import pickle

    import router.server  # noqa: F401  (registers how frozen mappings are pickled)

    config = load_config(env={})
    assert pickle.loads(pickle.dumps(config)) == config


def test_cache_and_rag_sections_load(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(
        "cache:\n"
        "  response: {redis_url: 'redis://127.0.0.1:6379/2', ttl_s: 60}\n"
        "  semantic: {enabled: true, threshold: 0.97}\n"
        "  embedding: {enabled: false}\n"
        "retrieval:\n"
        "  rag: {template: 'Notes: {passages} Ask: {question}', default_top_k: 2}\n"
    )
    config = load_config(path, env={})
    assert config.cache.response.redis_url == "redis://127.0.0.1:6379/2"
    assert config.cache.response.ttl_s == 60.0 and config.cache.response.enabled
    assert config.cache.semantic.threshold == 0.97 and not config.cache.embedding.enabled
    assert config.retrieval.rag.default_top_k == 2


_MODELS = """
models:
  - {name: smol, kind: generate, artifact: smollm2-135m-instruct}
  - {name: other, kind: generate, artifact: other-model}
  - {name: mini, kind: embed, artifact: all-minilm-l6-v2}
"""


def test_routing_section_loads_deployments_aliases_and_tasks(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(
        _MODELS
        + """
routing:
  deployments:
    - name: chat
      model: smol
      balancer: affinity
      replicas:
        - {name: cpu0}
        - {name: gpu, backend: openvino, device: GPU, weight: 3}
        - {name: far, backend: openai_http, url: "http://10.0.0.7:8000", remote_model: smollm2}
      retry: {max_attempts: 2, attempt_timeout_s: 1.5}
      health_check: {interval_s: 2}
      fallbacks: [spare]
    - name: spare
      model: smol
      replicas: [{name: r1}]
  aliases: {assistant: {chat: 95, spare: 5}}
  tasks: {chat: assistant, code: chat}
"""
    )
    config = load_config(path, env={})
    chat = config.routing.deployment("chat")
    assert [r.name for r in chat.replicas] == ["cpu0", "gpu", "far"]
    assert chat.replicas[2].remote and chat.retry.attempt_timeout_s == 1.5
    assert chat.health_check.interval_s == 2.0 and chat.fallbacks == ("spare",)
    assert dict(config.routing.aliases["assistant"]) == {"chat": 95.0, "spare": 5.0}
    assert dict(config.routing.tasks) == {"chat": "assistant", "code": "chat"}
    import pickle

    import router.server  # noqa: F401  (registers how frozen mappings are pickled)

    assert pickle.loads(pickle.dumps(config)) == config


def test_replica_model_takes_the_replicas_backend_and_url() -> None:
    from router.config import ModelConfig, replica_model
    from router.routing.config import ReplicaConfig

    model = ModelConfig(name="smol", kind="generate", artifact="a", max_slots=4)
    far = replica_model(
        model, "chat", ReplicaConfig(name="far", backend="openai_http", url="http://h:1")
    )
    assert far.name == "chat/far" and far.backend == "openai_http" and far.max_slots == 4
    assert far.remote is not None and far.remote.url == "http://h:1" and far.remote.model == "smol"
    gpu = replica_model(model, "chat", ReplicaConfig(name="g", backend="openvino", device="GPU"))
    assert (gpu.backend, gpu.device, gpu.remote) == ("openvino", "GPU", None)


@pytest.mark.parametrize(
    ("routing", "message"),
    [
        (
            "{deployments: [{name: d, model: nope, replicas: [{name: r}]}]}",
            "routing.deployments['d'].model='nope' is not in models[]",
        ),
        (
            "{deployments: [{name: d, model: mini, replicas: [{name: r}]}], aliases: {a: {d: 1}}}",
            "routing.aliases['a'] names 'd', an embedding deployment",
        ),
        (
            "{deployments: [{name: d, model: mini, replicas: [{name: r}]}], tasks: {t: d}}",
            "routing.tasks['t'] names 'd', an embedding deployment",
        ),
        (
            "{deployments: [{name: other, model: smol, replicas: [{name: r}]}]}",
            "has the name of models['other']",
        ),
        (
            "{deployments: [{name: d, model: smol, replicas: [{name: r, backend: tgi}]}]}",
            "replicas['r'].backend='tgi' is unknown",
        ),
        (
            "{deployments: [{name: d, model: smol, replicas: [{name: r, backend: openai_http}]}]}",
            "replicas['r']: backend 'openai_http' needs a url",
        ),
        (
            "{deployments: [{name: d, model: smol, replicas: [{name: r, url: 'http://h:1'}]}]}",
            "backend 'onnxruntime' runs locally and takes no url",
        ),
        (
            "{deployments: [{name: d, model: smol, replicas: [{name: r, device: GPU}]}]}",
            "replicas['r']: models['d/r'].device='GPU'",
        ),
        (
            "{deployments: [{name: d, model: smol, replicas: [{name: r}], fallbacks: [e]},"
            " {name: e, model: other, replicas: [{name: r}]}]}",
            "fallbacks names 'e', which serves artifact 'other-model'",
        ),
        (
            "{deployments: [{name: d, model: smol, replicas: [{name: r}]}],"
            " aliases: {mini: {d: 1}}}",
            "routing.aliases['mini'] has the name of models['mini']",
        ),
        (
            "{deployments: [{name: d, model: smol, replicas: [{name: r}]}], tasks: {code: x}}",
            "routing.tasks['code']='x' is neither a deployment nor an alias",
        ),
        (
            "{deployments: [{name: d, model: smol, replicas: [{name: r}],"
            " health_check: {timeout_s: 0}}]}",
            "health_check.timeout_s=0",
        ),
        (
            "{deployments: [{name: d, model: smol, replicas: [{name: r, remote_model: m}]}]}",
            "remote_model applies to a remote replica",
        ),
        (
            "{deployments: [{name: d, model: smol,"
            " replicas: [{name: r, backend: openai_http, url: 'h:8000'}]}]}",
            "replicas['r']: models['d/r'].remote: url='h:8000' must start with http://",
        ),
    ],
)
def test_bad_routing_is_named(tmp_path: Path, routing: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(_MODELS + f"routing: {routing}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert message in str(info.value)


def test_kserve_model_and_replica_load(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(
        _MODELS
        + """
  - name: trt
    kind: generate
    artifact: smollm2-135m-instruct
    backend: kserve_grpc
    kserve: {url: "grpc://10.0.0.7:8001", model: ensemble, stream: "off"}
routing:
  deployments:
    - name: d
      model: smol
      replicas: [{name: t, backend: kserve_grpc, url: "10.0.0.9:8001", remote_model: ensemble}]
"""
    )
    config = load_config(path, env={})
    trt = next(m for m in config.models if m.name == "trt")
    assert trt.kserve is not None and trt.kserve.target == "10.0.0.7:8001"
    from router.config import replica_model

    dep = config.routing.deployment("d")
    smol = next(m for m in config.models if m.name == "smol")
    replica = replica_model(smol, "d", dep.replicas[0])
    assert replica.kserve is not None and replica.remote is None
    assert (replica.kserve.url, replica.kserve.model) == ("10.0.0.9:8001", "ensemble")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            "remote: {dialect: llama.cpp}",
            "models['far'].remote.url is missing: set it to the server root, e.g. http://",
        ),
        (
            "remote: {url: 'http://10.0.0.7:8000'}",
            "models['far'].remote.model is missing: set it to the model's name at http://",
        ),
        ("", "models['far'] has backend 'openai_http' and no remote: section; add one"),
    ],
)
def test_a_remote_model_without_its_endpoint_is_named(
    tmp_path: Path, section: str, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "models:\n  - {name: far, kind: generate, artifact: a, backend: openai_http"
        + (f", {section}" if section else "")
        + "}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert message in str(info.value)
    assert "__init__" not in str(info.value)


def test_a_missing_required_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  - {name: x, artifact: a}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "models[0] is missing required key(s) 'kind'; add `kind:`" in str(info.value)


def test_a_remote_model_behind_a_deployment_takes_its_replicas_urls(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(
        """
models:
  - {name: smol, kind: generate, artifact: a, backend: openai_http,
     remote: {dialect: llama.cpp, read_timeout_s: 30}}
routing:
  deployments:
    - name: chat
      model: smol
      replicas:
        - {name: a, backend: openai_http, url: "http://10.0.0.7:8000", remote_model: m1}
        - {name: b, backend: openai_http, url: "http://10.0.0.8:8000"}
"""
    )
    config = load_config(path, env={})
    from router.config import replica_model

    smol = config.models[0]
    dep = config.routing.deployment("chat")
    a, b = (replica_model(smol, "chat", r) for r in dep.replicas)
    assert a.remote is not None and (a.remote.url, a.remote.model) == ("http://10.0.0.7:8000", "m1")
    assert b.remote is not None and (b.remote.url, b.remote.model) == (
        "http://10.0.0.8:8000",
        "smol",
    )
    assert a.remote.dialect == "llama.cpp" and b.remote.read_timeout_s == 30


def test_a_replica_names_its_servers_dialect_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    from router.config import replica_model

    text = """
models:
  - {{name: hosted, kind: generate, backend: openai_http, remote: {{dialect: openai}}}}
routing:
  deployments:
    - name: chat
      model: hosted
      replicas:
        - {{name: a, backend: openai_http, url: "http://10.0.0.7:8000", dialect: {dialect}}}
        - {{name: b, backend: openai_http, url: "http://10.0.0.8:8000"}}
"""
    path = tmp_path / "router.yaml"
    path.write_text(text.format(dialect="vllm"))
    config = load_config(path, env={})
    hosted = config.models[0]
    assert hosted.passthrough  # no artifact
    a, b = (replica_model(hosted, "chat", r) for r in config.routing.deployment("chat").replicas)
    assert a.remote is not None and b.remote is not None
    assert (a.remote.dialect, b.remote.dialect) == ("vllm", "openai")
    path.write_text(text.format(dialect="tgi"))
    with pytest.raises(ConfigError, match=r"replicas\['a'\].*dialect='tgi' is unknown"):
        load_config(path, env={})


def test_a_replica_takes_its_api_key_from_the_environment_variable_it_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from router.config import replica_model

    path = tmp_path / "router.yaml"
    path.write_text(
        """
models:
  - {name: hosted, kind: generate, backend: openai_http}
routing:
  deployments:
    - name: chat
      model: hosted
      replicas:
        - name: az
          backend: openai_http
          url: "https://res.openai.azure.com/openai/deployments/gpt"
          dialect: azure
          api_version: "2024-10-21"
          api_key_env: TEST_AZURE_KEY
"""
    )
    monkeypatch.delenv("TEST_AZURE_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"replicas\['az'\].*TEST_AZURE_KEY.*not set"):
        load_config(path, env={})
    monkeypatch.setenv("TEST_AZURE_KEY", "secret")
    config = load_config(path, env={})
    replica = config.routing.deployment("chat").replicas[0]
    remote = replica_model(config.models[0], "chat", replica).remote
    assert remote is not None
    assert (remote.api_key, remote.api_version, remote.dialect) == ("secret", "2024-10-21", "azure")
