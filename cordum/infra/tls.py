"""TLS for our gRPC services, from the environment, per service (`SAFETY_KERNEL`, `CONTEXT_ENGINE`).

Server side (the service itself):
    <P>_TLS_CERT, <P>_TLS_KEY   its certificate chain and key: the service speaks TLS only
    <P>_TLS_CLIENT_CA           also require client certificates signed by this CA (mutual TLS)
Client side (the gateway and scheduler for the kernel, workers for the context engine):
    <P>_TLS_CA                  verify the service against this CA: the client speaks TLS only
    <P>_TLS_CLIENT_CERT, <P>_TLS_CLIENT_KEY   the client certificate presented for mutual TLS
    <P>_TLS_SERVER_NAME         the name the service's certificate is checked for (default: its host)

Nothing set: plaintext, as in dev. Files are read at startup; one that cannot be read or parsed
stops the service with exit code 2, naming the variable.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Mapping

from cordum.infra.config import ConfigError

ALPN = ["h2"]  # gRPC runs over HTTP/2


@dataclass(frozen=True)
class GrpcTls:
    prefix: str
    cert: str = ""
    key: str = ""
    client_ca: str = ""
    ca: str = ""
    client_cert: str = ""
    client_key: str = ""
    server_name: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str], prefix: str) -> "GrpcTls":
        def get(name: str) -> str:
            return (env.get(f"{prefix}_TLS_{name}") or "").strip()

        tls = cls(prefix, get("CERT"), get("KEY"), get("CLIENT_CA"), get("CA"), get("CLIENT_CERT"),
                  get("CLIENT_KEY"), get("SERVER_NAME"))
        for first, second in (("CERT", "KEY"), ("CLIENT_CERT", "CLIENT_KEY")):
            if bool(get(first)) != bool(get(second)):
                raise ConfigError(f"{prefix}_TLS_{first} and {prefix}_TLS_{second} go together: set both or neither")
        if tls.client_ca and not tls.cert:
            raise ConfigError(f"{prefix}_TLS_CLIENT_CA is invalid without {prefix}_TLS_CERT/_KEY "
                              "(client certificates are asked for over TLS)")
        return tls

    def server_context(self) -> ssl.SSLContext | None:
        """The listening side's context, or None for plaintext."""
        if not self.cert:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load_chain(context, "CERT", self.cert, "KEY", self.key)
        if self.client_ca:
            self._load_ca(context, "CLIENT_CA", self.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        context.set_alpn_protocols(ALPN)
        return context

    def client_context(self) -> ssl.SSLContext | None:
        """The dialling side's context, or None for plaintext."""
        if not self.ca:
            if self.client_cert:
                raise ConfigError(f"{self.prefix}_TLS_CLIENT_CERT is invalid without {self.prefix}_TLS_CA "
                                  "(the service is verified before a certificate is shown to it)")
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the peer and its name
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load_ca(context, "CA", self.ca)
        if self.client_cert:
            self._load_chain(context, "CLIENT_CERT", self.client_cert, "CLIENT_KEY", self.client_key)
        context.set_alpn_protocols(ALPN)
        return context

    def _load_chain(self, context: ssl.SSLContext, cert_name: str, cert: str, key_name: str, key: str) -> None:
        try:
            context.load_cert_chain(cert, key)
        except FileNotFoundError as exc:
            which = cert_name if exc.filename in (None, cert) else key_name
            raise ConfigError(f"{self.prefix}_TLS_{which} is invalid: no such file") from None
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{self.prefix}_TLS_{cert_name}/{self.prefix}_TLS_{key_name} are invalid: "
                              f"not a certificate and its key ({exc.__class__.__name__})") from None

    def _load_ca(self, context: ssl.SSLContext, name: str, path: str) -> None:
        try:
            context.load_verify_locations(cafile=path)
        except FileNotFoundError:
            raise ConfigError(f"{self.prefix}_TLS_{name} is invalid: no such file") from None
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{self.prefix}_TLS_{name} is invalid: not a CA certificate ({exc.__class__.__name__})") from None
