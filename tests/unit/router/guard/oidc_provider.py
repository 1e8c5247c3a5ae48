"""A real OIDC provider for the auth tests: discovery and JWKS served over HTTP from a thread on
127.0.0.1:0, counting its hits, plus signing keys of each kind."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

AUDIENCE = "irouter"


@dataclass
class Signer:
    kid: str
    alg: str
    private_key: Any
    public_jwk: dict[str, Any]

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        return jwt.encode(
            claims, self.private_key, algorithm=self.alg, headers={"kid": self.kid, **header}
        )

    def public_pem(self) -> bytes:
        pem: bytes = self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem


@functools.cache
def _rsa_key(n: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def rsa_signer(kid: str, n: int = 0) -> Signer:
    key = _rsa_key(n)
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return Signer(kid, "RS256", key, {**jwk, "kid": kid, "use": "sig"})


def ec_signer(kid: str) -> Signer:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return Signer(kid, "ES256", key, {**jwk, "kid": kid})


def ed_signer(kid: str) -> Signer:
    key = ed25519.Ed25519PrivateKey.generate()
    jwk = OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return Signer(kid, "EdDSA", key, {**jwk, "kid": kid})


def claims(issuer: str, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": issuer,
        "aud": AUDIENCE,
        "sub": "user-1",
        "tenant": "acme",
        "scope": "generate embed",
        "iat": now,
        "exp": now + 600,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    """A token built by hand, as an attacker would: HMAC-SHA256 with `secret`, or unsigned."""
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    if secret is None:
        return signing_input + "."
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(mac)


class OidcProvider:
    """Serves /.well-known/openid-configuration and /jwks; `hits` counts requests per path."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.hits: Counter[str] = Counter()
        self.delay_s = 0.0
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                provider.hits[self.path] += 1
                body: dict[str, Any]
                time.sleep(provider.delay_s)
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": provider.issuer, "jwks_uri": provider.issuer + "/jwks"}
                elif self.path == "/jwks":
                    body = {"keys": list(provider.keys)}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.issuer = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    def publish(self, *signers: Signer) -> None:
        self.keys = [signer.public_jwk for signer in signers]

    @property
    def jwks_hits(self) -> int:
        return self.hits["/jwks"]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
