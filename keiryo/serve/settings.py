"""The server's configuration: :class:`ServeSettings` (models, keys, batching, limits, deadlines, gRPC),
:class:`TLSSettings`, and :func:`uvicorn_options` (how uvicorn is run for keiryo)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field

from keiryo.config import KeiryoConfig
from keiryo.errors import ConfigError

_SERVED = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")


class TLSSettings(KeiryoConfig):
    certfile: str = Field(description="the server's certificate chain (PEM)")
    keyfile: str = Field(description="its private key (PEM)")
    ca_certs: str | None = Field(None, description="CA bundle: clients must present a certificate it signed (mTLS)")

    def check_files(self) -> None:
        for f in (self.certfile, self.keyfile, self.ca_certs):
            if f is not None and not Path(f).is_file():
                raise ConfigError(f"{f}: TLS file not found")

    def uvicorn(self) -> dict[str, Any]:
        import ssl

        self.check_files()
        kw: dict[str, Any] = {"ssl_certfile": self.certfile, "ssl_keyfile": self.keyfile}
        if self.ca_certs:
            kw |= {"ssl_ca_certs": self.ca_certs, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        return kw


class ServeSettings(KeiryoConfig):
    models: list[str] = Field(
        min_length=1,
        description="NAME or NAME@ALIAS from the registry, served under NAME; SERVED=REF serves REF under SERVED "
        "(e.g. digits@staging=digits@staging beside digits@production=digits@production)",
    )
    public_key: str = Field(description="the signer's public key (PEM): every package is verified against it")
    api_keys: list[str] = Field(default_factory=list, description="bearer keys for inference and metadata")
    admin_keys: list[str] = Field(default_factory=list, description="bearer keys for the model-repository endpoints")
    allow_anonymous: bool = Field(False, description="serve inference without a key (never the admin endpoints)")
    threads: int = Field(1, ge=1, description="intra-op threads of each model's session")
    max_batch_size: int = Field(32, ge=1, description="rows per batched run; 1 disables batching")
    max_queue_delay_ms: float = Field(2.0, ge=0, description="how long the first request waits for others")
    max_queue: int = Field(256, ge=1, description="requests waiting per model before 503")
    inline_below_ms: float = Field(
        2.0,
        ge=0,
        description="a lone request to an idle model whose lone runs take under this runs on the event loop, "
        "while traffic is serial (0: never; see keiryo.serve.batching)",
    )
    body_limit_bytes: int = Field(16 * 2**20, ge=1024)
    request_timeout_s: float = Field(10.0, gt=0)
    parse_offload_bytes: int = Field(
        256 * 1024, ge=0, description="a JSON part this large or larger is parsed in a worker process, off the event loop"
    )
    parse_bytes_in_flight: int = Field(
        32 * 2**20,
        ge=1,
        description="most bytes of JSON parsed off the event loop at once (past it: 503 with Retry-After); "
        "never below the body limit",
    )
    header_timeout_s: float = Field(10.0, gt=0, description="a connection must send complete request headers within this")
    body_timeout_s: float = Field(10.0, gt=0, description="longest wait for the next piece of a request body (408)")
    poll_s: float | None = Field(5.0, gt=0, description="refresh the registry's metadata this often (None: never)")
    trusted_root: str | None = Field(
        None, description="TUF root metadata to trust (default: the local registry's tuf/1.root.json)"
    )
    tuf_cache: str | None = Field(None, description="where the trusted metadata is kept between runs")
    decryption_key: str | None = Field(None, description="key file for encrypted packages (default $KEIRYO_DECRYPTION_KEY)")
    drift_window_rows: int = Field(
        1000, ge=10, description="rows of recent traffic compared with the package's drift reference (keiryo.drift)"
    )
    drift_psi_threshold: float = Field(
        0.2, gt=0, description="log a drift event when the predicted classes' PSI against the reference goes over this"
    )
    public_metrics: bool = Field(False, description="serve /metrics without an API key (e.g. a scraper on a private network)")
    public_docs: bool = Field(False, description="serve /docs and /openapi.json without an API key")
    server_name: str = "keiryo"
    grpc_port: int | None = Field(None, ge=0, le=65535, description="also serve the OIP over gRPC on this port (0: any free one)")
    grpc_host: str = Field("0.0.0.0", description="the gRPC endpoint's address")
    grpc_max_message_bytes: int = Field(
        64 * 2**20, ge=1024, description="largest gRPC message received or sent (RESOURCE_EXHAUSTED beyond)"
    )
    grpc_tls: TLSSettings | None = Field(
        None, description="TLS (and mTLS) for the gRPC endpoint; keiryo serve uses the REST one's"
    )

    def served_refs(self) -> dict[str, str]:
        """served name -> registry ref, from :attr:`models`."""
        out: dict[str, str] = {}
        for entry in self.models:
            served, eq, ref = entry.partition("=")
            if not eq:
                served, ref = entry.partition("@")[0], entry
            if not _SERVED.fullmatch(served) or not ref:
                raise ConfigError(
                    f"--model {entry!r}: expected NAME, NAME@ALIAS or SERVED=NAME@ALIAS (SERVED: letters, digits, . _ - @)"
                )
            if served in out:
                raise ConfigError(f"--model {entry!r}: {served!r} is already served as {out[served]!r}")
            out[served] = ref
        return out

    def check(self) -> None:
        self.served_refs()
        if not self.api_keys and not self.allow_anonymous:
            raise ConfigError("no API key given: pass --api-key (or KEIRYO_API_KEYS), or --allow-anonymous to serve without one")
        if any(len(k) < 16 for k in [*self.api_keys, *self.admin_keys]):
            raise ConfigError("API keys must be at least 16 characters")


def uvicorn_options(
    settings: ServeSettings, tls: TLSSettings | None = None, limit_concurrency: int | None = 1000
) -> dict[str, Any]:
    """uvicorn's settings for keiryo's server: drain time, connection deadlines and cap, TLS."""
    from keiryo.serve.connections import http_protocol

    return {
        "access_log": False,
        "timeout_graceful_shutdown": 30,
        "timeout_keep_alive": 5,  # idle keep-alive connections are closed
        # and so are ones that never finish a header; the front's answers leave in one write
        "http": http_protocol(settings.header_timeout_s),
        "limit_concurrency": limit_concurrency,  # connections + tasks past this get 503 instead of memory
        **(tls.uvicorn() if tls else {}),
    }
