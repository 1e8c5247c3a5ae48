"""google.api.HttpRule: the path template grammar and the bindings read from service descriptors.

    Template = "/" Segments [ Verb ] ;
    Segments = Segment { "/" Segment } ;
    Segment  = "*" | "**" | LITERAL | Variable ;
    Variable = "{" FieldPath [ "=" Segments ] "}" ;
    FieldPath = IDENT { "." IDENT } ;
    Verb     = ":" LITERAL ;

A template compiles to one regular expression over the raw (still percent-encoded) path, so that
an encoded "/" inside a single-segment variable stays inside it. `{name}` is `{name=*}`; "**"
matches the rest of the path and may only be the last segment."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from google.api import annotations_pb2, http_pb2
from google.protobuf.descriptor import MethodDescriptor

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LITERAL = re.compile(r"[^/*{}:=]+")
_METHODS = ("get", "put", "post", "delete", "patch")


class TemplateError(ValueError):
    """A path template that does not follow the HttpRule grammar."""


@dataclass(frozen=True)
class Variable:
    """A path variable: the request field it sets and the segments it spans."""

    field_path: tuple[str, ...]
    segments: tuple[str, ...]

    @property
    def multi_segment(self) -> bool:
        return len(self.segments) != 1 or self.segments[0] == "**"


@dataclass(frozen=True)
class PathTemplate:
    """A parsed template; `pattern` matches a raw request path."""

    source: str
    segments: tuple[str | Variable, ...]
    verb: str | None
    pattern: re.Pattern[str]

    @property
    def variables(self) -> tuple[Variable, ...]:
        return tuple(s for s in self.segments if isinstance(s, Variable))

    @property
    def shape(self) -> str:
        """Templates of one shape match the same paths, whatever their fields are called
        (groups are named by position): used to answer 405 with every allowed method."""
        return self.pattern.pattern

    def match(self, raw_path: str) -> dict[str, str] | None:
        """The variables' values by dotted field path, percent-decoded ("%2F" decodes to "/"
        only inside a single-segment variable, as the HttpRule spec says), or None."""
        found = self.pattern.fullmatch(raw_path)
        if found is None:
            return None
        values: dict[str, str] = {}
        for i, variable in enumerate(self.variables):
            raw = found.group(f"v{i}")
            if variable.multi_segment:
                value = "/".join(unquote(part) for part in raw.split("/"))
            else:
                value = unquote(raw)
            values[".".join(variable.field_path)] = value
        return values

    def openapi_path(self) -> str:
        """The template in OpenAPI's syntax: each variable as `{field.path}`."""
        parts = [
            "{" + ".".join(s.field_path) + "}" if isinstance(s, Variable) else s
            for s in self.segments
        ]
        return "/" + "/".join(parts) + (f":{self.verb}" if self.verb else "")


def parse_template(source: str) -> PathTemplate:
    """Parse an HttpRule path template; TemplateError names the position and what was wrong."""
    parser = _Parser(source)
    segments, verb = parser.template()
    regex: list[str] = []
    index = 0
    for segment in segments:
        if isinstance(segment, Variable):
            inner = "/".join(_segment_regex(s) for s in segment.segments)
            regex.append(f"(?P<v{index}>{inner})")
            index += 1
        else:
            regex.append(_segment_regex(segment))
    pattern = "/" + "/".join(regex) + (re.escape(f":{verb}") if verb else "")
    return PathTemplate(source, tuple(segments), verb, re.compile(pattern))


def _segment_regex(segment: str) -> str:
    if segment == "*":
        return "[^/]+?"
    if segment == "**":
        return ".+?"
    return re.escape(segment)


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.pos = 0

    def fail(self, what: str) -> TemplateError:
        return TemplateError(f"path template {self.source!r} at offset {self.pos}: {what}")

    def eat(self, token: str) -> bool:
        if self.source.startswith(token, self.pos):
            self.pos += len(token)
            return True
        return False

    def template(self) -> tuple[list[str | Variable], str | None]:
        if not self.eat("/"):
            raise self.fail("a template starts with '/'")
        segments = self.segments(in_variable=False)
        verb: str | None = None
        if self.eat(":"):
            verb = self.literal()
        if self.pos != len(self.source):
            raise self.fail(f"unexpected {self.source[self.pos]!r}")
        flat = [p for s in segments for p in (s.segments if isinstance(s, Variable) else (s,))]
        if "**" in flat[:-1]:
            raise TemplateError(f"path template {self.source!r}: '**' must be the last segment")
        names = [".".join(s.field_path) for s in segments if isinstance(s, Variable)]
        if len(set(names)) != len(names):
            raise TemplateError(f"path template {self.source!r} binds a field twice")
        return segments, verb

    def segments(self, *, in_variable: bool) -> list[str | Variable]:
        out: list[str | Variable] = [self.segment(in_variable=in_variable)]
        while self.eat("/"):
            out.append(self.segment(in_variable=in_variable))
        return out

    def segment(self, *, in_variable: bool) -> str | Variable:
        if self.eat("**"):
            return "**"
        if self.eat("*"):
            return "*"
        if self.source.startswith("{", self.pos):
            if in_variable:
                raise self.fail("variables cannot nest")
            return self.variable()
        return self.literal()

    def literal(self) -> str:
        found = _LITERAL.match(self.source, self.pos)
        if found is None:
            raise self.fail("expected a literal segment, '*', '**' or '{field}'")
        self.pos = found.end()
        return found.group()

    def variable(self) -> Variable:
        self.eat("{")
        path = [self.ident()]
        while self.eat("."):
            path.append(self.ident())
        segments: list[str] = ["*"]
        if self.eat("="):
            inner = self.segments(in_variable=True)
            segments = [s for s in inner if isinstance(s, str)]
        if not self.eat("}"):
            raise self.fail("expected '}'")
        return Variable(tuple(path), tuple(segments))

    def ident(self) -> str:
        found = _IDENT.match(self.source, self.pos)
        if found is None:
            raise self.fail("expected a field name")
        self.pos = found.end()
        return found.group()


@dataclass(frozen=True)
class Binding:
    """One HTTP binding of an RPC: method, path, and where the request body goes ("*": the
    whole request, a field name: that field, "": no body)."""

    method: MethodDescriptor
    http_method: str
    template: PathTemplate
    body: str
    response_body: str

    @property
    def rpc_name(self) -> str:
        return f"{self.method.containing_service.name}.{self.method.name}"


def bindings(method: MethodDescriptor) -> list[Binding]:
    """The method's `google.api.http` rule and its additional_bindings, in order; [] when the
    method has no rule. ValueError names the method when a rule is malformed."""
    options = method.GetOptions()
    if not options.HasExtension(annotations_pb2.http):
        return []
    rule = options.Extensions[annotations_pb2.http]
    out = [_binding(method, rule)]
    for extra in rule.additional_bindings:
        if extra.additional_bindings:
            raise ValueError(f"{method.full_name}: additional_bindings cannot nest")
        out.append(_binding(method, extra))
    return out


def _binding(method: MethodDescriptor, rule: http_pb2.HttpRule) -> Binding:
    kind = rule.WhichOneof("pattern")
    if kind is None or kind == "custom":
        raise ValueError(f"{method.full_name}: the HTTP rule needs one of {', '.join(_METHODS)}")
    template = parse_template(getattr(rule, kind))
    request = method.input_type
    for variable in template.variables:
        _check_field_path(method, variable.field_path)
    if rule.body not in ("", "*") and rule.body not in request.fields_by_name:
        raise ValueError(f"{method.full_name}: body {rule.body!r} is not a field of {request.name}")
    return Binding(method, kind.upper(), template, rule.body, rule.response_body)


def _check_field_path(method: MethodDescriptor, path: tuple[str, ...]) -> None:
    message = method.input_type
    for i, name in enumerate(path):
        field = message.fields_by_name.get(name)
        if field is None:
            raise ValueError(
                f"{method.full_name}: path variable {'.'.join(path)!r} names no field "
                f"({name!r} is not in {message.name})"
            )
        if i < len(path) - 1:
            if field.message_type is None:
                raise ValueError(f"{method.full_name}: {'.'.join(path[: i + 1])} is not a message")
            message = field.message_type
        elif field.message_type is not None or field.is_repeated:
            raise ValueError(f"{method.full_name}: path variable {name!r} must be a scalar")
