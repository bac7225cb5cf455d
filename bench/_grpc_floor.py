"""The least a Python gRPC server can do for one OIP ModelInfer: the floor keiryo's gRPC endpoint is measured against.

Run by bench/serve_grpc.py in its own process: ``python _grpc_floor.py MODEL PORT aio|sync THREADS``. It serves
``ModelInfer`` (decode the raw contents of the first input, one onnxruntime run on the handler's own thread, the
first output back as raw contents) and ``ServerLive``, with keiryo's generated stubs and nothing else: no key, no
checks, no metrics, no log, no batcher. ``aio`` is a ``grpc.aio`` server on uvloop (keiryo's transport), ``sync`` a
``grpc.server`` with a one-thread pool. It prints ``ready`` once it listens.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort

from keiryo.serve._oip import grpc_predict_v2_pb2 as pb
from keiryo.serve._oip import grpc_predict_v2_pb2_grpc as pb_grpc


def main() -> None:
    model, port, mode, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    out_name = sess.get_outputs()[0].name

    def infer(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        t = request.inputs[0]
        x = np.frombuffer(request.raw_input_contents[0], "<f4").reshape(tuple(t.shape))
        y = np.ascontiguousarray(sess.run(None, {t.name: x})[0], "<f4")
        reply = pb.ModelInferResponse(model_name=request.model_name)
        reply.outputs.add(name=out_name, datatype="FP32", shape=y.shape)
        reply.raw_output_contents.append(y.tobytes())
        return reply

    live = pb.ServerLiveResponse(live=True)
    if mode == "sync":
        import grpc

        class Sync(pb_grpc.GRPCInferenceServiceServicer):
            def ModelInfer(self, request, context):  # noqa: N802
                return infer(request)

            def ServerLive(self, request, context):  # noqa: N802
                return live

        server = grpc.server(ThreadPoolExecutor(max_workers=1))
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Sync(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        print("ready", flush=True)
        server.wait_for_termination()
        return

    import asyncio

    import grpc.aio
    import uvloop

    class Aio(pb_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request, context):  # noqa: N802
            return infer(request)

        async def ServerLive(self, request, context):  # noqa: N802
            return live

    async def serve() -> None:
        server = grpc.aio.server()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Aio(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve())


if __name__ == "__main__":
    main()
