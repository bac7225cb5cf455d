"""The Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``, KServe's
``grpc_predict_v2.proto`` plus its model-repository RPCs), served by ``grpc.aio`` on the REST
server's event loop.

It shares everything with REST but the wire: the :class:`Server` (the same loaded models, hot reload
and batcher: :meth:`Server.run` is the one inference path), the key check (metadata
``authorization: Bearer KEY``; the admin key for the repository RPCs), the input checks of
:mod:`keiryo.serve.protocol`, the status mapping of :mod:`keiryo.serve.errors` (an HTTP status turned
into its gRPC code), the Prometheus metrics (endpoints ``grpc_infer`` and ``grpc_other``) and the
JSON access log. Outputs always travel in ``raw_output_contents`` (as Triton answers): the same
little-endian bytes the REST binary extension sends. Messages over ``grpc_max_message_bytes`` are
refused by gRPC itself with RESOURCE_EXHAUSTED.

The stubs in ``keiryo/serve/_oip`` are generated (the command is in the ``.proto``). They register the
protocol's message names (``inference.*``) in protobuf's default pool, as ``tritonclient.grpc``'s
own stubs do: the two cannot be imported into one process.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from keiryo.errors import ConfigError, PackageNotFoundError
from keiryo.serve.auth import Authorize
from keiryo.serve.errors import GRPC_CODES, error_message, status_of
from keiryo.serve.front import log_access
from keiryo.serve.lifecycle import Server
from keiryo.serve.protocol import ProtocolError, add_input, check_complete, check_tensor, datatype_of, from_raw

T = TypeVar("T")

# the typed-contents field of each datatype (FP16 has none: raw contents only)
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
_FIELDS = (*sorted(set(_CONTENTS.values())), "bytes_contents")
_SERVICE = "/inference.GRPCInferenceService/"


def decode_inputs(request: Any, expected: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
    """A ``ModelInferRequest``'s inputs as arrays, checked like a REST request's (names, datatypes,
    shapes, element counts, NaN/Inf, integer ranges); typed contents or raw_input_contents."""
    if not request.inputs:
        raise ProtocolError("request needs at least one input")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    arrays: dict[str, np.ndarray] = {}
    for i, t in enumerate(request.inputs):
        shape = list(t.shape)
        dtype, count = check_tensor(t.name, t.datatype, shape, expected, arrays)
        if raw:
            if t.HasField("contents"):
                raise ProtocolError(f"input {t.name!r}: typed contents and raw_input_contents both given")
            arr = from_raw(raw[i], t.datatype, count, t.name)
        else:
            arr = _from_contents(t, dtype, count)
        add_input(arrays, t.name, arr, shape)
    check_complete(arrays, expected)
    return arrays


def _from_contents(t: Any, dtype: np.dtype, count: int) -> np.ndarray:
    field = _CONTENTS.get(t.datatype)
    if field is None:
        raise ProtocolError(f"input {t.name!r}: {t.datatype} has no typed contents; send it in raw_input_contents")
    c = t.contents
    stray = [f for f in _FIELDS if f != field and len(getattr(c, f))]
    if stray:
        raise ProtocolError(f"input {t.name!r}: {t.datatype} data belongs in contents.{field}, got {stray[0]}")
    values = getattr(c, field)
    if len(values) != count:
        raise ProtocolError(f"input {t.name!r}: {len(values)} elements for shape {list(t.shape)} ({count} expected)")
    if dtype.kind not in "iu":
        return np.array(values, dtype)
    wide = np.array(values, np.uint64 if field == "uint64_contents" else np.int64)
    arr = wide.astype(dtype)
    if not np.array_equal(arr, wide):
        raise ProtocolError(f"input {t.name!r}: values out of range for {t.datatype}")
    return arr


def encode_outputs(pb: Any, served: Any, request: Any, outputs: dict[str, np.ndarray]) -> Any:
    """The ``ModelInferResponse``: the requested outputs (all when none is named) as raw contents."""
    names = [o.name for o in request.outputs] or list(outputs)
    unknown = [n for n in names if n not in outputs]
    if unknown:
        raise ProtocolError(f"unknown outputs {unknown}; the model's outputs are {sorted(outputs)}")
    resp = pb.ModelInferResponse(model_name=served.name, model_version=served.version, id=request.id)
    for n in names:
        a = np.ascontiguousarray(outputs[n])
        resp.outputs.add(name=n, datatype=datatype_of(a), shape=a.shape)
        resp.raw_output_contents.append(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
    return resp


class InferenceServicer:
    """``inference.GRPCInferenceService`` over a :class:`Server`. Every RPC goes through :meth:`_serve`:
    the key check, the in-flight gauge, the request counter (and latency for ModelInfer), the access
    log line and the status mapping."""

    def __init__(self, server: Server, authorize: Authorize):
        from keiryo.serve._oip import grpc_predict_v2_pb2 as pb

        self.pb, self.server, self.authorize = pb, server, authorize
        self._ids = map(f"g{os.urandom(5).hex()}-{{:x}}".format, itertools.count(1))

    async def _serve(
        self, context: Any, rpc: str, model: str, handler: Callable[[], Awaitable[T]], *, auth: str | None = "api"
    ) -> T:
        import grpc

        t0 = time.perf_counter()
        status = 499  # what is counted when no answer was made: the client went away (cancelled) first
        metadata = {m.key: m.value for m in context.invocation_metadata() or ()}
        metrics = self.server.metrics
        metrics.per_request.in_flight += 1
        try:
            if auth is not None:
                header = metadata.get("authorization")
                self.authorize(header if isinstance(header, str) else None, admin=auth == "admin")
            result = await handler()
            status = 200
            return result
        except Exception as e:
            status = status_of(e)
            code = getattr(grpc.StatusCode, GRPC_CODES.get(status, "INTERNAL"))
            await context.abort(code, error_message(status, e))
            raise  # abort raises; never reached
        finally:
            metrics.per_request.in_flight -= 1
            dt = time.perf_counter() - t0
            endpoint = "grpc_infer" if rpc == "ModelInfer" else "grpc_other"
            metrics.request(self.server.label(model) if model else "", endpoint, status, dt)
            rid = metadata.get("x-request-id")
            rid = rid[:128] if isinstance(rid, str) and rid else next(self._ids)
            log_access(rid, "GRPC", _SERVICE + rpc, status, dt, context.peer())

    # -- health and metadata -----------------------------------------------------------------------
    async def ServerLive(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            return self.pb.ServerLiveResponse(live=True)

        return await self._serve(context, "ServerLive", "", run, auth=None)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            return self.pb.ServerReadyResponse(ready=self.server.ready)

        return await self._serve(context, "ServerReady", "", run, auth=None)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            try:
                self.server.get(request.name, request.version or None)
            except PackageNotFoundError:
                return self.pb.ModelReadyResponse(ready=False)
            return self.pb.ModelReadyResponse(ready=True)

        return await self._serve(context, "ModelReady", request.name, run)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        from keiryo import __version__

        async def run() -> Any:
            ext = ["binary_tensor_data", "model_repository"]
            return self.pb.ServerMetadataResponse(name=self.server.settings.server_name, version=__version__, extensions=ext)

        return await self._serve(context, "ServerMetadata", "", run)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            m = self.server.get(request.name, request.version or None).metadata()
            tensors = {k: [self.pb.ModelMetadataResponse.TensorMetadata(**t) for t in m[k]] for k in ("inputs", "outputs")}
            return self.pb.ModelMetadataResponse(name=m["name"], versions=m["versions"], platform=m["platform"], **tensors)

        return await self._serve(context, "ModelMetadata", request.name, run)

    # -- inference ---------------------------------------------------------------------------------
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            served = self.server.get(request.model_name, request.model_version or None)
            outputs = await self.server.run(served, decode_inputs(request, served.inputs))
            return encode_outputs(self.pb, served, request, outputs)

        return await self._serve(context, "ModelInfer", request.model_name, run)

    # -- model repository extension (admin) --------------------------------------------------------
    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            rows = [r for r in self.server.index() if r["state"] == "READY" or not request.ready]
            models = [self.pb.RepositoryIndexResponse.ModelIndex(**{k: r[k] for k in ("name", "version", "state")}) for r in rows]
            return self.pb.RepositoryIndexResponse(models=models)

        return await self._serve(context, "RepositoryIndex", "", run, auth="admin")

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            # registry names only, never a path from the request; the registry's current signed state
            await self.server.load(request.model_name, refresh=True)
            return self.pb.RepositoryModelLoadResponse()

        return await self._serve(context, "RepositoryModelLoad", request.model_name, run, auth="admin")

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            await self.server.unload(request.model_name)
            return self.pb.RepositoryModelUnloadResponse()

        return await self._serve(context, "RepositoryModelUnload", request.model_name, run, auth="admin")


async def start_grpc(server: Server, authorize: Authorize) -> Any:
    """Start the gRPC endpoint on the running event loop (the REST server's) at the settings' host and
    ``grpc_port`` (0: a free port; the bound one is kept in ``server.grpc_bound``); returns the
    ``grpc.aio.Server`` (``await stop(grace)`` it before draining the models)."""
    try:
        import grpc
    except ImportError as e:
        from keiryo.errors import BackendUnavailableError

        raise BackendUnavailableError("grpcio (the gRPC endpoint)", "serve") from e
    from keiryo.serve._oip import grpc_predict_v2_pb2_grpc as pb_grpc

    s = server.settings
    limit = s.grpc_max_message_bytes
    g = grpc.aio.server(options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(server, authorize), g)
    address = f"{s.grpc_host}:{s.grpc_port}"
    try:
        if s.grpc_tls is not None:
            tls = s.grpc_tls
            tls.check_files()
            ca = Path(tls.ca_certs).read_bytes() if tls.ca_certs else None
            chain = [(Path(tls.keyfile).read_bytes(), Path(tls.certfile).read_bytes())]
            creds = grpc.ssl_server_credentials(chain, root_certificates=ca, require_client_auth=ca is not None)
            port = g.add_secure_port(address, creds)
        else:
            port = g.add_insecure_port(address)
    except RuntimeError as e:
        raise ConfigError(f"gRPC address {address}: cannot bind ({e})") from e
    if not port:
        raise ConfigError(f"gRPC address {address}: cannot bind")
    await g.start()
    server.grpc_bound = port
    return g
