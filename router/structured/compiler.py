"""Compiling structured-output specs against one model's tokenizer: off the event loop and the
engine thread, within a time limit, once per distinct spec (an LRU of compiled grammars).

A compiled grammar is an llguidance matcher that is never advanced; each request decodes with a
deep copy of it (`CompiledGrammar.new_matcher`), made on the engine thread when the request
first samples.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from llguidance import LLMatcher, LLParserLimits, LLTokenizer
from tokenizers import Tokenizer

from backends.base import StructuredOutput
from router.errors import InvalidArgument
from router.structured.grammar import field, to_grammar

logger = logging.getLogger(__name__)

COMPILE_TIMEOUT_S = 2.0
"""A spec whose compilation takes longer is refused (the compile itself is bounded by LIMITS;
this bounds the call's wait, queueing behind other compiles included)."""

CACHE_ENTRIES = 256
"""Compiled grammars kept per model, least recently used dropped first."""

LIMITS = LLParserLimits(verbose_errors=False)
"""llguidance's own bounds on lexer and parser work (its defaults), without the parser state
and grammar text in error messages (those go back to clients)."""

_compile_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="irouter-grammar")
"""One thread: compiles queue behind each other instead of taking every core from decoding."""


class CompiledGrammar:
    """A spec compiled for one tokenizer; shared by every request that asks for it."""

    def __init__(self, spec: StructuredOutput, template: LLMatcher, seconds: float) -> None:
        self.spec = spec
        self._template = template
        self.compile_seconds = seconds

    def new_matcher(self) -> LLMatcher:
        """A matcher at the start of the grammar, for one request."""
        return self._template.deep_copy()


class GrammarCompiler:
    """Compiles specs for one model. `tokenizer` is the model's, `vocab_size` its logits'
    width, `eos_ids` the tokens that end its output (allowed once the grammar is complete)."""

    def __init__(
        self,
        model: str,
        tokenizer: Tokenizer,
        vocab_size: int,
        eos_ids: list[int],
        *,
        timeout_s: float = COMPILE_TIMEOUT_S,
        entries: int = CACHE_ENTRIES,
    ) -> None:
        self.model = model
        self._hf = tokenizer
        self.vocab_size = vocab_size
        self._eos_ids = list(eos_ids)
        self._timeout_s = timeout_s
        self._entries = entries
        self._view: LLTokenizer | None = None
        self._view_lock = threading.Lock()
        self._cache: collections.OrderedDict[StructuredOutput, CompiledGrammar] = (
            collections.OrderedDict()
        )
        self._pending: dict[StructuredOutput, asyncio.Future[CompiledGrammar]] = {}

    async def compile(self, spec: StructuredOutput) -> CompiledGrammar:
        """The compiled grammar for `spec` (cached); InvalidArgument naming the field when it
        does not compile, admits no token, or takes longer than the time limit."""
        hit = self._cache.get(spec)
        if hit is not None:
            self._cache.move_to_end(spec)
            return hit
        text = to_grammar(spec)
        loop = asyncio.get_running_loop()
        if self._view is None:  # built once per model (~0.4 s at 49k tokens), not timed
            await loop.run_in_executor(_compile_pool, self._tokenizer_view)
        pending = self._pending.get(spec)
        if pending is None:
            pending = asyncio.ensure_future(
                loop.run_in_executor(_compile_pool, self._compile, spec, text)
            )
            self._pending[spec] = pending
            pending.add_done_callback(lambda _: self._finish(spec, pending))
        try:
            return await asyncio.wait_for(asyncio.shield(pending), self._timeout_s)
        except TimeoutError:
            raise InvalidArgument(
                f"{field(spec)} did not compile within {self._timeout_s:g} s for model "
                f"{self.model!r}; simplify it",
                field=field(spec),
            ) from None

    def _finish(self, spec: StructuredOutput, done: asyncio.Future[CompiledGrammar]) -> None:
        self._pending.pop(spec, None)
        if done.cancelled() or done.exception() is not None:
            return
        self._cache[spec] = done.result()
        while len(self._cache) > self._entries:
            self._cache.popitem(last=False)

    def _tokenizer_view(self) -> LLTokenizer:
        with self._view_lock:
            if self._view is None:
                started = time.perf_counter()
                self._view = LLTokenizer(
                    self._hf.to_str(), n_vocab=self.vocab_size, eos_token=self._eos_ids
                )
                logger.info(
                    "model %s: tokenizer prepared for structured outputs in %.2f s",
                    self.model,
                    time.perf_counter() - started,
                )
            return self._view

    def _compile(self, spec: StructuredOutput, text: str) -> CompiledGrammar:
        """On the compile thread (llguidance releases the GIL while it builds)."""
        started = time.perf_counter()
        matcher = LLMatcher(self._tokenizer_view(), text, log_level=0, limits=LIMITS)
        where = field(spec)
        if not matcher.is_error():
            first = matcher.compute_bitmask()  # a grammar that no token of ours can start
            if not matcher.is_error() and not any(first):
                raise InvalidArgument(
                    f"{where} admits no token of model {self.model!r}'s vocabulary", field=where
                )
        if matcher.is_error():
            raise InvalidArgument(f"{where} is not usable: {matcher.get_error()}", field=where)
        return CompiledGrammar(spec, matcher, time.perf_counter() - started)
