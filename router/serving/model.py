"""A served model: its configuration, what loading it produced (manifest, tokenizer, engine or
encoder), and where it stands in its life cycle."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from backends.base import RemoteEmbedder
from router.config import ModelConfig
from router.routing.config import DeploymentConfig, ReplicaConfig
from router.routing.embedder import RoutedEmbedder
from router.scheduler.batcher import EncoderBatcher
from router.scheduler.generation import GenerationEngine
from router.serving.tokenize import PieceCache
from router.structured.compiler import GrammarCompiler


@dataclass
class ServedModel:
    config: ModelConfig
    model_dir: Path
    manifest: dict[str, Any] = field(default_factory=dict)
    tokenizer: Tokenizer | None = None
    pieces: PieceCache | None = None
    """Its prompts' pieces between added tokens, encoded once (router.serving.tokenize)."""
    engine: GenerationEngine | None = None
    batcher: EncoderBatcher | None = None
    remote_embedder: RemoteEmbedder | None = None
    """An embedding model served by a remote server (instead of `batcher`)."""
    routed_embedder: RoutedEmbedder | None = None
    """An embedding deployment: its replicas as one embedder (instead of `batcher`)."""
    context_length: int = 0
    max_token_bytes: int = 0
    """The most UTF-8 bytes one of its tokens stands for (router.serving.tokenize); 0 unknown."""
    dimension: int = 0
    ready: bool = False
    error: str = ""
    draining: bool = False
    """Being removed: new calls are refused, calls in flight finish (Catalog.remove)."""
    deployment: DeploymentConfig | None = None
    """Set on a deployment (engine: RoutedEngine over `replicas`)."""
    replicas: tuple[ServedModel, ...] = ()
    """A deployment's replicas, in config order."""
    replica: ReplicaConfig | None = None
    """Set on a replica of a deployment."""
    grammars: GrammarCompiler | None = None
    """Structured outputs compiled for its tokenizer (made at the first call that asks)."""

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def loaded(self) -> bool:
        """Whether loading built what serves it (an engine, encoder or embedder)."""
        return any(
            x is not None
            for x in (self.engine, self.batcher, self.remote_embedder, self.routed_embedder)
        )
