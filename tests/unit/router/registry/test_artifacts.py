"""Model artifacts are checked before the registry records them: the packaged models and local
GGUF files and prepared folders are found, typed and hashed; anything the router could not
prepare or serve is refused with a message naming the field and the fix; a deployment's
verify_unchanged refuses an artifact that is gone or changed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from router.errors import FailedPrecondition, InvalidArgument, NotFound, RouterError
from router.models.prepare import (
    FORMAT_VERSION,
    minilm_source_dir,
    read_manifest,
    smollm2_gguf_path,
)
from router.registry.artifacts import (
    PACKAGES,
    Artifact,
    CheckedArtifact,
    check_artifact,
    verify_unchanged,
)
from router.registry.digest import folder_digest

HEX64 = re.compile(r"[0-9a-f]{64}")
TEMPLATE = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
LAYER_TENSORS = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    chat_template: str | None = TEMPLATE,
    tensors: bool = True,
    context_length: int = 256,
) -> Path:
    """A tiny GGUF (a 1-block llama of width 4 with a 4-token vocabulary): every key and tensor
    the router's preparation reads, each optional part switchable off."""
    writer = GGUFWriter(str(path), arch=arch)
    writer.add_block_count(1)
    writer.add_context_length(context_length)
    writer.add_embedding_length(4)
    writer.add_feed_forward_length(8)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(["a", "b", "ab", "<|im_end|>"])
    writer.add_token_types([1, 1, 1, 3])
    writer.add_token_merges(["a b"])
    writer.add_eos_token_id(3)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    if tensors:
        names = ["token_embd.weight", "output_norm.weight"]
        names += [f"blk.0.{t}.weight" for t in LAYER_TENSORS]
        for name in names:
            writer.add_tensor(name, np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_prepared(folder: Path, *, kind: str = "decoder", **manifest: object) -> Path:
    """A folder shaped like `irouter models prepare`'s output (the graph bytes are not ONNX:
    the check reads the manifest, not the graph)."""
    folder.mkdir(parents=True)
    content: dict[str, object] = {"format_version": FORMAT_VERSION, "kind": kind}
    if kind == "decoder":
        content |= {
            "context_length": 2048,
            "vocab_size": 4,
            "num_layers": 1,
            "num_kv_heads": 1,
            "head_dim": 2,
            "stop_token_ids": [3],
            "chat_template": TEMPLATE,
        }
    else:
        content |= {"embedding_dim": 4, "max_length": 128, "context_length": 128}
    content |= manifest
    (folder / "manifest.json").write_text(json.dumps(content), encoding="utf-8")
    (folder / "model.onnx").write_bytes(b"graph")
    (folder / "tokenizer.json").write_text("{}", encoding="utf-8")
    return folder


def path_artifact(path: Path | str) -> Artifact:
    return Artifact(source="path", location=str(path))


def refused(artifact: Artifact, kind: str, error: type[RouterError]) -> str:
    """The message check_artifact refuses `artifact` with, asserting the error class."""
    with pytest.raises(error) as info:
        check_artifact(artifact, kind)
    assert type(info.value) is error
    return str(info.value)


@pytest.fixture(scope="module")
def smollm2_package() -> CheckedArtifact:
    """Checked once: reading the GGUF's metadata (a 49k-token vocabulary) takes seconds."""
    return check_artifact(Artifact(source="package", location="smollm2-135m-instruct"), "generate")


# The packaged models.


def test_packaged_smollm2_is_its_gguf_file(smollm2_package: CheckedArtifact) -> None:
    gguf = smollm2_gguf_path()
    with open(gguf, "rb") as f:
        expected = hashlib.file_digest(f, "sha256").hexdigest()
    assert smollm2_package.format == "gguf"
    assert smollm2_package.kind == "generate"
    assert HEX64.fullmatch(smollm2_package.sha256)
    assert smollm2_package.sha256 == expected
    assert smollm2_package.size_bytes == gguf.stat().st_size
    assert smollm2_package.context_length == 8192
    verify_unchanged(smollm2_package)


def test_packaged_minilm_is_its_safetensors_folder() -> None:
    artifact = Artifact(source="package", location="all-minilm-l6-v2")
    checked = check_artifact(artifact, "embed")
    assert (checked.format, checked.kind, checked.context_length) == ("safetensors", "embed", 512)
    assert HEX64.fullmatch(checked.sha256)
    assert checked.sha256 == check_artifact(artifact, "embed").sha256
    assert checked.sha256 == folder_digest(minilm_source_dir())[0]
    files = [p for p in minilm_source_dir().rglob("*") if p.is_file()]
    hashed = [p for p in files if not p.name.startswith(".")]
    assert (minilm_source_dir() / "model.safetensors") in hashed
    assert checked.size_bytes == sum(p.stat().st_size for p in hashed)
    verify_unchanged(checked)


def test_packages_table_names_the_served_models() -> None:
    assert PACKAGES == {"smollm2-135m-instruct": "generate", "all-minilm-l6-v2": "embed"}


def test_unknown_package_lists_the_known_ones() -> None:
    message = refused(Artifact(source="package", location="gpt-5"), "generate", InvalidArgument)
    assert message.startswith("artifact.package='gpt-5' is unknown")
    assert "smollm2-135m-instruct" in message and "all-minilm-l6-v2" in message


def test_a_package_of_the_other_kind_is_refused_naming_both() -> None:
    message = refused(
        Artifact(source="package", location="all-minilm-l6-v2"), "generate", InvalidArgument
    )
    assert "artifact.package='all-minilm-l6-v2'" in message
    assert "kind 'embed'" in message and "kind='generate'" in message
    with pytest.raises(InvalidArgument) as info:
        check_artifact(Artifact(source="package", location="smollm2-135m-instruct"), "embed")
    assert info.value.field == "kind"


# Local paths.


def test_a_gguf_path_is_hashed_like_its_package(smollm2_package: CheckedArtifact) -> None:
    checked = check_artifact(path_artifact(smollm2_gguf_path()), "generate")
    assert (checked.format, checked.kind, checked.context_length) == ("gguf", "generate", 8192)
    assert checked.sha256 == smollm2_package.sha256
    assert checked.size_bytes == smollm2_package.size_bytes


def test_prepared_folders_from_the_model_cache(model_cache: Path) -> None:
    folder = model_cache / "smollm2-135m-instruct"
    decoder = check_artifact(path_artifact(folder), "generate")
    assert (decoder.format, decoder.kind, decoder.context_length) == ("onnx", "generate", 8192)
    assert HEX64.fullmatch(decoder.sha256)
    # Every file counts but dot-entries and the OpenVINO IR the router caches there itself.
    counted = [
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.relative_to(folder).parts[0] != "openvino"
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    assert (folder / "model.onnx") in counted
    assert decoder.size_bytes == sum(p.stat().st_size for p in counted)
    verify_unchanged(decoder)
    encoder = check_artifact(path_artifact(model_cache / "all-minilm-l6-v2"), "embed")
    assert (encoder.format, encoder.kind) == ("onnx", "embed")
    manifest = read_manifest(model_cache / "all-minilm-l6-v2")
    assert manifest is not None
    assert encoder.context_length == manifest["context_length"] > 0
    assert encoder.sha256 != decoder.sha256


def test_a_tiny_gguf_is_read_from_its_metadata(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", context_length=4096)
    checked = check_artifact(path_artifact(path), "generate")
    assert (checked.format, checked.kind, checked.context_length) == ("gguf", "generate", 4096)
    assert checked.size_bytes == path.stat().st_size
    assert checked.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_path_must_be_given_and_absolute() -> None:
    message = refused(path_artifact("models/tiny.gguf"), "generate", InvalidArgument)
    assert message.startswith("artifact.path='models/tiny.gguf' is relative")
    assert "absolute" in message
    assert "empty" in refused(path_artifact(""), "generate", InvalidArgument)


def test_missing_path_is_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.gguf"
    message = refused(path_artifact(missing), "generate", NotFound)
    assert message.startswith(f"artifact.path={str(missing)!r} does not exist")


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    message = refused(path_artifact(path), "generate", FailedPrecondition)
    assert "is not a GGUF file" in message and ".gguf" in message


def test_a_truncated_gguf_is_refused(tmp_path: Path) -> None:
    whole = write_gguf(tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:40])
    assert "is not a readable GGUF file" in refused(
        path_artifact(cut), "generate", FailedPrecondition
    )


def test_a_bare_onnx_graph_points_at_its_folder(tmp_path: Path) -> None:
    folder = write_prepared(tmp_path / "model")
    message = refused(path_artifact(folder / "model.onnx"), "generate", FailedPrecondition)
    assert "bare ONNX graph" in message and str(folder) in message


def test_a_gguf_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "bert.gguf", arch="bert")
    message = refused(path_artifact(path), "embed", FailedPrecondition)
    assert "general.architecture='bert'" in message and "'llama' only" in message


def test_a_gguf_without_chat_template_is_refused(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "base.gguf", chat_template=None)
    assert "no tokenizer.chat_template" in refused(
        path_artifact(path), "generate", FailedPrecondition
    )


def test_a_gguf_without_its_tensors_is_refused(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "empty.gguf", tensors=False)
    message = refused(path_artifact(path), "generate", FailedPrecondition)
    assert "lacks 11 of the 11 tensors" in message and "token_embd.weight" in message


def test_a_gguf_registered_as_embed_is_refused(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf")
    message = refused(path_artifact(path), "embed", InvalidArgument)
    assert "kind 'generate'" in message and "kind='embed'" in message


def test_a_folder_without_manifest_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    message = refused(path_artifact(folder), "generate", FailedPrecondition)
    assert "without manifest.json or model.onnx" in message
    assert "irouter models prepare" in message


def test_a_manifest_of_another_format_version_is_refused(tmp_path: Path) -> None:
    folder = write_prepared(tmp_path / "old", format_version=FORMAT_VERSION - 1)
    message = refused(path_artifact(folder), "generate", FailedPrecondition)
    assert f"format_version={FORMAT_VERSION - 1}" in message and "prepare it again" in message


def test_a_prepared_folder_lacking_what_its_engine_reads_is_refused(tmp_path: Path) -> None:
    folder = write_prepared(tmp_path / "decoder", chat_template="")
    (folder / "tokenizer.json").unlink()
    message = refused(path_artifact(folder), "generate", FailedPrecondition)
    assert "lacks tokenizer.json, chat_template" in message


def test_a_prepared_encoder_registered_as_generate_is_refused(tmp_path: Path) -> None:
    folder = write_prepared(tmp_path / "encoder", kind="encoder")
    assert check_artifact(path_artifact(folder), "embed").context_length == 128
    message = refused(path_artifact(folder), "generate", InvalidArgument)
    assert "kind 'embed'" in message and "kind='generate'" in message


# Request values.


def test_unknown_kind_and_source_name_their_field() -> None:
    with pytest.raises(InvalidArgument) as info:
        check_artifact(Artifact(source="package", location="all-minilm-l6-v2"), "rerank")
    assert info.value.field == "kind" and "generate, embed" in str(info.value)
    with pytest.raises(InvalidArgument) as info:
        check_artifact(Artifact(source="s3", location="bucket/model"), "generate")
    assert info.value.field == "artifact.source" and "package, path, remote" in str(info.value)


def test_remote_fields_on_a_local_artifact_are_refused(tmp_path: Path) -> None:
    artifact = Artifact(source="path", location=str(tmp_path), remote_backend="openai_http")
    with pytest.raises(InvalidArgument) as info:
        check_artifact(artifact, "generate")
    assert info.value.field == "artifact.remote.backend"
    assert "applies to source 'remote' only" in str(info.value)


def test_long_client_values_are_quoted_bounded(tmp_path: Path) -> None:
    long_name = "x" * 5000
    for artifact in (
        Artifact(source="package", location=long_name),
        path_artifact(long_name),
        Artifact(source="remote", location="ftp://" + long_name, remote_backend="openai_http"),
    ):
        message = refused(artifact, "generate", InvalidArgument)
        assert long_name not in message and "characters)" in message
        assert len(message) < 500


# Remote servers.


@pytest.mark.parametrize(
    ("backend", "url", "kind"),
    [
        ("openai_http", "http://10.0.0.7:8000", "generate"),
        ("openai_http", "https://llm.example.com/", "embed"),
        ("kserve_grpc", "10.0.0.7:8001", "generate"),
        ("kserve_grpc", "grpc://triton.local:8001", "generate"),
    ],
)
def test_a_remote_url_is_recorded_without_digest(backend: str, url: str, kind: str) -> None:
    artifact = Artifact(source="remote", location=url, remote_backend=backend)
    checked = check_artifact(artifact, kind)
    assert checked == CheckedArtifact(
        artifact=artifact, format="remote", kind=kind, sha256="", size_bytes=0, context_length=0
    )
    verify_unchanged(checked)  # nothing to hash: reachability is the deployment's check


@pytest.mark.parametrize(
    ("backend", "url", "says"),
    [
        ("openai_http", "", "url is missing"),
        ("openai_http", "ftp://10.0.0.7", "must start with http:// or https://"),
        ("openai_http", "10.0.0.7:8000", "must start with http:// or https://"),
        ("openai_http", "http://", "has no host"),
        ("openai_http", "http://:8000/v1", "has no host"),
        ("openai_http", "http://host:port", "no valid port"),
        ("openai_http", "http://host:70000", "no valid port"),
        ("openai_http", "http://[::1", "malformed [IPv6] host"),
        ("openai_http", "http://my host:8000", "holds whitespace"),
        ("kserve_grpc", "", "url is missing"),
        ("kserve_grpc", "triton.local", "must be 'host:port'"),
        ("kserve_grpc", "http://triton.local:8001", "must be 'host:port'"),
        ("kserve_grpc", "triton.local:70000", "no valid port"),
    ],
)
def test_a_remote_url_that_does_not_parse_is_refused(backend: str, url: str, says: str) -> None:
    artifact = Artifact(source="remote", location=url, remote_backend=backend)
    with pytest.raises(InvalidArgument) as info:
        check_artifact(artifact, "generate")
    assert info.value.field == "artifact.remote.url"
    assert str(info.value).startswith("artifact.remote.url")
    assert says in str(info.value)


def test_remote_backend_must_be_known_and_fit_the_kind() -> None:
    with pytest.raises(InvalidArgument) as info:
        check_artifact(Artifact(source="remote", location="http://h:1"), "generate")
    assert info.value.field == "artifact.remote.backend"
    assert "openai_http, kserve_grpc" in str(info.value)
    kserve = Artifact(source="remote", location="h:8001", remote_backend="kserve_grpc")
    with pytest.raises(InvalidArgument) as info:
        check_artifact(kserve, "embed")
    assert "generate models only" in str(info.value) and "openai_http" in str(info.value)


def _openai(**server: str) -> Artifact:
    """An OpenAI-compatible server's artifact (an Azure deployment's URL) with `server`'s fields."""
    url = "https://res.openai.azure.com/openai/deployments/gpt-4o"
    return Artifact("remote", url, "openai_http", **server)


KSERVE = Artifact("remote", "h:8001", "kserve_grpc")


def test_a_remote_server_names_its_dialect_api_version_and_key_variable() -> None:
    azure = _openai(
        remote_dialect="azure", remote_api_version="2024-10-21", remote_api_key_env="AZURE_KEY"
    )
    assert check_artifact(azure, "generate").artifact == azure
    vllm = _openai(remote_dialect="vllm")
    assert check_artifact(vllm, "embed").artifact == vllm


REMOTE_SERVER_REFUSALS = {
    "dialect on a package": (
        Artifact("package", "smollm2-135m-instruct", remote_dialect="vllm"),
        "artifact.remote.dialect",
        "applies to source 'remote' only",
    ),
    "key variable on a path": (
        Artifact("path", "/models/x.gguf", remote_api_key_env="KEY"),
        "artifact.remote.api_key_env",
        "applies to source 'remote' only",
    ),
    "dialect on kserve_grpc": (
        dataclasses.replace(KSERVE, remote_dialect="vllm"),
        "artifact.remote.dialect",
        "backend 'openai_http' takes one of",
    ),
    "key variable on kserve_grpc": (
        dataclasses.replace(KSERVE, remote_api_key_env="KEY"),
        "artifact.remote.api_key_env",
        "backend 'openai_http' takes the name",
    ),
    "unknown dialect": (
        _openai(remote_dialect="tgi"),
        "artifact.remote.dialect",
        "takes one of openai, azure, vllm, trtllm, llama.cpp, ovms",
    ),
    "azure without api_version": (
        _openai(remote_dialect="azure"),
        "artifact.remote.api_version",
        "dialect 'azure' needs one",
    ),
    "api_version without azure": (
        _openai(remote_dialect="vllm", remote_api_version="2024-10-21"),
        "artifact.remote.api_version",
        "only it takes one",
    ),
    "key variable with a dash": (
        _openai(remote_api_key_env="AZURE-KEY"),
        "artifact.remote.api_key_env",
        "the name of an environment variable",
    ),
    "key variable starting with a digit": (
        _openai(remote_api_key_env="1KEY"),
        "artifact.remote.api_key_env",
        "the name of an environment variable",
    ),
}


@pytest.mark.parametrize("case", sorted(REMOTE_SERVER_REFUSALS))
def test_a_remote_servers_fields_are_refused_by_name(case: str) -> None:
    artifact, field, says = REMOTE_SERVER_REFUSALS[case]
    with pytest.raises(InvalidArgument) as info:
        check_artifact(artifact, "generate")
    assert info.value.field == field and str(info.value).startswith(field)
    assert says in str(info.value)


# Before deployment.


def test_verify_unchanged_refuses_a_changed_or_removed_file(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf")
    checked = check_artifact(path_artifact(path), "generate")
    verify_unchanged(checked)
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(FailedPrecondition) as info:
        verify_unchanged(checked)
    message = str(info.value)
    assert message.startswith(f"artifact.path={str(path)!r} sha256 changed")
    assert f"registered {checked.sha256[:12]}…" in message
    assert "register a new version" in message
    path.unlink()
    with pytest.raises(NotFound):
        verify_unchanged(checked)


def test_verify_unchanged_sees_every_file_of_a_folder(tmp_path: Path) -> None:
    folder = write_prepared(tmp_path / "decoder")
    checked = check_artifact(path_artifact(folder), "generate")
    # What the router writes into a prepared folder itself is no change of the artifact.
    (folder / "openvino" / "gguf-weights").mkdir(parents=True)
    (folder / "openvino" / "gguf-weights" / "openvino_model.xml").write_text("<ir/>")
    (folder / ".tokenizer.json.tmp-1").write_text("partial")
    verify_unchanged(checked)
    renamed = tmp_path / "renamed"
    shutil.copytree(folder, renamed)
    (renamed / "tokenizer.json").rename(renamed / "tokenizer2.json")
    assert folder_digest(renamed)[0] != folder_digest(folder)[0]
    (folder / "tokenizer.json").write_text('{"changed": true}')
    with pytest.raises(FailedPrecondition, match="sha256 changed"):
        verify_unchanged(checked)
    shutil.rmtree(folder)
    with pytest.raises(NotFound, match="no longer exists"):
        verify_unchanged(checked)


def test_folder_digest_is_the_documented_record_list(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    files = {"b.txt": b"two", "a.txt": b"one", "sub/c.bin": b"\0three"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / ".hidden").write_bytes(b"skipped")
    expected = hashlib.sha256()
    for name in sorted(files):
        record = f"{name}\0{hashlib.sha256(files[name]).hexdigest()}\n"
        expected.update(record.encode())
    assert folder_digest(tmp_path) == (expected.hexdigest(), sum(map(len, files.values())))
