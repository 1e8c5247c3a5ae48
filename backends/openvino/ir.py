"""The OpenVINO IR of a GGUF decoder, converted by OpenVINO GenAI once and cached.

GenAI reads a GGUF directly but converts it on every load; asked to (`enable_save_ov_model`)
it saves the converted model next to the GGUF it read. The first load therefore reads the GGUF
from a staging folder, which is then published under <model_dir>/openvino/<variant>/ by one
rename; later loads read the IR from there.

Variants: GenAI maps Q4_1 blocks (w = d*q + m) to u4 with an integer zero point, rounding m/d,
so weights move by up to d/2 and greedy text departs from llama.cpp's (and from the fp32 ONNX
reference) within a few tokens. 'gguf-weights' accepts that (the fast default); 'f16-weights'
first rewrites every quantized tensor as F16, which holds these blocks exactly, for
precision='f32'.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import openvino_genai as ov_genai

IR_XML = "openvino_model.xml"


def cached_ir(model_dir: Path, exact: bool) -> Path:
    """Where the converted IR of this model and weight variant lives."""
    return Path(model_dir) / "openvino" / ("f16-weights" if exact else "gguf-weights")


def write_f16_gguf(source: Path, target: Path) -> None:
    """Copy a GGUF with every quantized tensor dequantized to F16 (its layout kept, so GenAI
    un-permutes Q/K as usual). Q4_1/Q8_0 values d*q + m fit F16 without loss here."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    reader = GGUFReader(str(source))
    # arch=None: general.architecture is copied with the other fields (arch= would add it twice).
    writer = GGUFWriter(str(target), arch=None)  # type: ignore[arg-type]
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue  # the header's own fields; the writer emits them
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            writer.add_key_value(field.name, field.contents(), kind, sub_type=field.types[-1])
        else:
            writer.add_key_value(field.name, field.contents(), kind)
    for tensor in reader.tensors:
        if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = np.asarray(tensor.data)
        else:
            data = dequantize(tensor.data, tensor.tensor_type).astype(np.float16)
        writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def load_pipeline(
    model_dir: Path,
    gguf_path: Path | None,
    *,
    exact: bool,
    scheduler: ov_genai.SchedulerConfig,
    device: str,
    properties: dict[str, Any],
) -> ov_genai.ContinuousBatchingPipeline:
    """The pipeline over the cached IR, converting the GGUF first if there is none yet."""
    target = cached_ir(model_dir, exact)
    if (target / IR_XML).is_file():
        return ov_genai.ContinuousBatchingPipeline(str(target), scheduler, device, properties)
    if gguf_path is None or not Path(gguf_path).is_file():
        raise ValueError(
            f"no OpenVINO IR in {target} yet and gguf_path={gguf_path} is not a file: "
            "the first load converts the model's GGUF"
        )
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        source = staging / "model.gguf"
        if exact:
            write_f16_gguf(Path(gguf_path), source)
        else:
            source.symlink_to(Path(gguf_path).resolve())
        pipe = ov_genai.ContinuousBatchingPipeline(
            str(source), scheduler, device, properties | {"enable_save_ov_model": True}
        )
        source.unlink()
        if not (staging / IR_XML).is_file():
            raise RuntimeError(f"OpenVINO GenAI saved no {IR_XML} in {staging}")
        try:
            staging.rename(target)
        except OSError:
            if not (target / IR_XML).is_file():  # else another process published it first
                raise
        return pipe
    finally:
        shutil.rmtree(staging, ignore_errors=True)
