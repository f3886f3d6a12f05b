#!/usr/bin/python3
"""attnd client example: create a session, prefill one sequence, run one decode step.

Usage: tools/example_client.py [HOST:PORT]   (default 127.0.0.1:50051)
Needs the Python stubs the build generates (build/py) and Debian's python3-grpcio and
python3-numpy, hence /usr/bin/python3 rather than whatever python3 comes first on PATH.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "build", "py"))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from attnd.v1 import attention_pb2 as pb  # noqa: E402
from attnd.v1 import attention_pb2_grpc as pb_grpc  # noqa: E402

HQ, HKV, D = 32, 8, 128  # Llama-3.1-8B attention shape


def main():
    target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
    stub = pb_grpc.AttentionStub(grpc.insecure_channel(target))
    model = pb.ModelConfig(name="llama-3.1-8b", num_layers=32, num_query_heads=HQ,
                           num_kv_heads=HKV, head_dim=D, dtype=pb.F32)
    info = stub.CreateSession(pb.CreateSessionRequest(session="example", model=model,
                                                      kv_capacity_tokens=4096))
    print(f"session {info.session} on {info.device}: {info.kv_capacity_tokens} tokens of KV")

    rng = np.random.default_rng(0)

    def attend(layer, seq_id, start, n):
        q = rng.standard_normal((n, HQ, D), dtype=np.float32)
        k = rng.standard_normal((n, HKV, D), dtype=np.float32)
        v = rng.standard_normal((n, HKV, D), dtype=np.float32)
        resp = stub.Attend(pb.AttendRequest(
            session="example", layer=layer,
            chunks=[pb.SequenceChunk(seq_id=seq_id, start_pos=start, num_tokens=n)],
            q=q.tobytes(), k=k.tobytes(), v=v.tobytes()), timeout=30)
        return np.frombuffer(resp.out, dtype=np.float32).reshape(n, HQ, D)

    out = attend(layer=0, seq_id=1, start=0, n=16)  # prefill 16 tokens
    print("prefill out", out.shape)
    out = attend(layer=0, seq_id=1, start=16, n=1)  # one decode step
    print("decode out", out.shape, "first values", out[0, 0, :4])
    print(stub.GetSession(pb.GetSessionRequest(session="example")))
    stub.CloseSession(pb.CloseSessionRequest(session="example"))


if __name__ == "__main__":
    main()
