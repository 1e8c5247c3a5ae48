"""The `retrieval.rag` section of the config file (kept apart from rag.py, which needs the model
registry, so that router.config can import it)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_TOP_K = 64
"""Most passages one retrieval option may ask for."""


@dataclass(frozen=True)
class RagConfig:
    template: str = (
        "Answer the question using the passages below when they are relevant.\n\n"
        "{passages}\n\nQuestion: {question}"
    )
    """Replaces the last user message (chat) or the prompt; {passages} and {question} required."""
    passage_template: str = "[{n}] {text}"
    """One passage; may use {n} (1-based rank), {text}, {id}, {document_id}, {score}."""
    separator: str = "\n\n"
    """Between passages."""
    default_top_k: int = 4
    """Passages retrieved when the request leaves top_k unset."""

    def validate(self) -> None:
        for key in ("{passages}", "{question}"):
            if key not in self.template:
                raise ValueError(f"retrieval.rag.template must contain {key}")
        if "{text}" not in self.passage_template:
            raise ValueError("retrieval.rag.passage_template must contain {text}")
        try:
            self.template.format(passages="", question="")
            self.passage_template.format(n=1, text="", id="", document_id="", score=0.0)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"retrieval.rag templates: bad placeholder {exc}; "
                "escape literal braces as {{{{ }}}}"
            ) from None
        if not 1 <= self.default_top_k <= MAX_TOP_K:
            raise ValueError(f"retrieval.rag.default_top_k={self.default_top_k} not in [1, 64]")
