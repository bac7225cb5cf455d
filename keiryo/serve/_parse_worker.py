"""The worker process of :mod:`keiryo.serve.offload`: parses big OIP REST request bodies.

Run as a script (``python .../_parse_worker.py``), not as ``-m keiryo.serve...``, so that it imports numpy and
``protocol.py`` only (loaded by path: keiryo's packages would pull in the server's whole stack). Frames on
stdin: ``<II`` (meta length, body length), meta (JSON ``[header_length, expected]``), body; on stdout: ``<Q``
length, then a pickle of ``("ok", (id, inputs, outputs, binary_outputs, binary_all))``, ``("bad", message)``
(a :class:`ProtocolError`: 400) or ``("error", message)``. It exits when stdin closes.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import struct
import sys
from pathlib import Path


def main() -> None:
    spec = importlib.util.spec_from_file_location("_keiryo_protocol", Path(__file__).with_name("protocol.py"))
    assert spec is not None and spec.loader is not None
    protocol = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = protocol  # dataclasses look their module up
    spec.loader.exec_module(protocol)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = inp.read(8)
        if len(head) < 8:
            return  # the server closed the pipe (or is gone)
        meta_len, body_len = struct.unpack("<II", head)
        header_length, expected = json.loads(inp.read(meta_len))
        body = inp.read(body_len)
        try:
            r = protocol.parse_request(body, header_length, expected)
            result: tuple[str, object] = ("ok", (r.id, r.inputs, r.outputs, r.binary_outputs, r.binary_all))
        except protocol.ProtocolError as e:
            result = ("bad", str(e))
        except Exception as e:  # a bug: the server answers 500 and logs it
            result = ("error", f"{type(e).__name__}: {e}")
        del body
        payload = pickle.dumps(result, protocol=5)
        out.write(struct.pack("<Q", len(payload)))
        out.write(payload)
        out.flush()


if __name__ == "__main__":
    main()
